"""`xllm bench engine --speculative METHOD`: speculative decoding against none, in one run.

Three workloads, each run without speculation, with adaptive draft lengths and with fixed ones (every
draft proposed is scored), interleaved round by round on fresh prompts:
  (a) repetitive: batch 1, a prompt holding a code block the answer reproduces with an edit; greedy
  (b) open chat: batch 1, questions with little to copy; temperature 0.7, seeded
  (c) batch 32: the chat questions 32 at a time
Output is identical with and without speculation (greedy and seeded), so equal token counts are timed;
the benchmark checks that and says so. With a draft model (`--speculative draft --draft-model M`) only
greedy output is: sampled output then follows the same distribution, but is another sample ("-").
"""

import random
import time

import numpy as np

from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.loader import Checkpoint
from shared.engine.sampling_params import SamplingParams
from xllm.bench.workloads import code_edit_prompt

TOPICS = (
    "the sea",
    "a city at night",
    "how bread is made",
    "the history of the bicycle",
    "why the sky is blue",
    "a dog who learns to read",
    "the moon",
    "winter in the mountains",
    "how a river forms",
    "a friendly robot",
    "the first day of school",
    "a market in the morning",
)
CONFIGS = ("none", "adaptive", "fixed")


def code_prompt(rng: random.Random) -> tuple[str, SamplingParams]:
    prompt = code_edit_prompt(np.random.default_rng(rng.randrange(1 << 30)))
    return prompt, SamplingParams(temperature=0.0, max_tokens=200)


def chat_prompt(rng: random.Random) -> tuple[str, SamplingParams]:
    prompt = f"Write a short paragraph about {rng.choice(TOPICS)}."
    return prompt, SamplingParams(temperature=0.7, seed=rng.randrange(1 << 30), max_tokens=128)


WORKLOADS = {
    "(a) repetitive, batch 1": (code_prompt, 1),
    "(b) open chat, batch 1": (chat_prompt, 1),
    "(c) chat, batch 32": (chat_prompt, 32),
}


def run(
    ckpt: Checkpoint,
    model: str,
    method: str,
    max_draft: int,
    threads: int,
    rounds: int,
    seed: int,
    draft_model: str | None = None,
) -> int:
    llms = {name: LLM(engine_config(name, model, method, max_draft, threads, draft_model), ckpt) for name in CONFIGS}
    drafter = f" (draft model {draft_model})" if draft_model else ""
    print(
        f"model {ckpt.config.name}  fp32  threads {threads}  speculative {method}{drafter}, at most {max_draft} "
        f"draft tokens; {rounds} rounds, each config on the same fresh prompts; output tok/s, prefill included"
    )
    print(
        f"{'workload':<24} {'none':>7} {'adaptive':>9} {'fixed':>7} {'adapt/none':>10} {'fixed/none':>10} "
        f"{'accept':>7} {'mean len':>8} {'same out':>8}"
    )
    rng = random.Random(seed)
    for workload, (make_prompt, batch) in WORKLOADS.items():
        before = _spec_counts(llms["fixed"])
        rounds_of_prompts = [[make_prompt(rng) for _ in range(batch)] for _ in range(rounds)]
        rate, same = run_workload(llms, rounds_of_prompts)
        sampled = any(not params.greedy for batch_ in rounds_of_prompts for _, params in batch_)
        verdict = "-" if method == "draft" and sampled else "yes" if same else "NO"
        drafted, accepted, verified = (a - b for a, b in zip(_spec_counts(llms["fixed"]), before))
        print(
            f"{workload:<24} {rate['none']:>7.1f} {rate['adaptive']:>9.1f} {rate['fixed']:>7.1f} "
            f"{rate['adaptive'] / rate['none']:>9.2f}x {rate['fixed'] / rate['none']:>9.2f}x "
            f"{accepted / max(drafted, 1):>7.0%} {1 + accepted / max(verified, 1):>8.2f} "
            f"{verdict:>8}",
            flush=True,
        )
    print("accept, mean len: the fixed config's draft tokens accepted, and tokens per verification step")
    return 0


def engine_config(
    name: str, model: str, method: str, max_draft: int, threads: int, draft_model: str | None = None
) -> EngineConfig:
    """One of CONFIGS: no speculation, adaptive draft lengths or fixed ones."""
    return EngineConfig(
        model=model,
        num_threads=threads,
        kv_cache_memory=512 << 20,
        max_num_seqs=32,
        enable_prefix_caching=False,
        speculative="none" if name == "none" else method,
        num_speculative_tokens=max_draft,
        draft_length="fixed" if name == "fixed" else "adaptive",
        draft_model=None if name == "none" else draft_model,
    )


def run_workload(llms: dict[str, LLM], rounds: list[list[tuple[str, SamplingParams]]]) -> tuple[dict, bool]:
    """Each round's batch through every engine in turn: output tok/s per engine, and whether every output
    was the same."""
    seconds, tokens, same = dict.fromkeys(llms, 0.0), dict.fromkeys(llms, 0), True
    for batch in rounds:
        prompts, params = (list(column) for column in zip(*batch))
        outputs = {}
        for name, llm in llms.items():
            start = time.perf_counter()
            outputs[name] = [c.outputs[0].token_ids for c in llm.generate(prompts, params, chat=True)]
            seconds[name] += time.perf_counter() - start
            tokens[name] += sum(len(ids) for ids in outputs[name])
        same &= all(out == outputs["none"] for out in outputs.values())
    return {name: tokens[name] / seconds[name] for name in llms}, same


def _spec_counts(llm: LLM) -> tuple[int, int, int]:
    stats = llm.engine.stats()
    return (
        stats.get("spec_drafted_tokens", 0),
        stats.get("spec_accepted_tokens", 0),
        stats.get("spec_verifications", 0),
    )

"""How often drafts cut from the target's own layers are accepted: for each `--layers` spec, a draft model
is written (benchmarks/truncated_draft.py) and an engine drafting every token it may (fixed draft length)
generates greedily for a code-edit prompt and a chat prompt; prints the drafts accepted and the time.

    PYTHONPATH=. python benchmarks/draft_acceptance.py 0-3 0-3,26-29 0-14,16-29 0-29
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

from benchmarks.truncated_draft import layer_list, write_truncated
from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from xllm.bench.speculative import chat_prompt, code_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layers", nargs="+", help="layer specs to keep, e.g. 0-3,26-29")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.model)
    rng = random.Random(0)
    prompts = {"code edit": code_prompt(rng)[0], "chat": chat_prompt(rng)[0]}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(num_threads=args.threads, kv_cache_memory=256 << 20, enable_prefix_caching=False)
    plain = LLM(EngineConfig(model=args.model, **common), ckpt)
    print(f"{'layers kept':<24} {'prompt':<10} {'accepted':>12} {'seconds':>8} {'none s':>7}")
    for spec in args.layers:
        with tempfile.TemporaryDirectory() as folder:
            draft = write_truncated(args.model, layer_list(spec), Path(folder))
            config = EngineConfig(
                model=args.model, speculative="draft", draft_model=str(draft), draft_length="fixed", **common
            )
            llm = LLM(config, ckpt)
        spec_ = llm.engine.speculator
        for name, prompt in prompts.items():
            drafted, accepted = spec_.drafted, spec_.accepted
            start = time.perf_counter()
            out = llm.generate([prompt], params, chat=True)[0].outputs[0].token_ids
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            want = plain.generate([prompt], params, chat=True)[0].outputs[0].token_ids
            plain_seconds = time.perf_counter() - start
            assert out == want, "greedy output changed"
            drafted, accepted = spec_.drafted - drafted, spec_.accepted - accepted
            share = f"{accepted}/{drafted} {accepted / max(drafted, 1):.0%}"
            print(f"{spec:<24} {name:<10} {share:>12} {seconds:>8.1f} {plain_seconds:>7.1f}", flush=True)


if __name__ == "__main__":
    main()

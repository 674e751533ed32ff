"""One real measurement of a serving configuration: a closed batch of requests of one shape run in-process
through an engine set to that configuration, its output throughput and mean TPOT (what `xllm tune` checks its
choice with, and benchmarks/tuner.py's grid is made of).

One engine serves every run: its pool is made as large as the largest run needs, and a smaller configuration
holds back the blocks it does not have, so each run sees exactly its own KV capacity without reloading.
"""

import random
import statistics
import time
from dataclasses import dataclass, field

from shared.cost_model import StepSample
from shared.engine.llm_engine import LLMEngine
from shared.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Point:
    """A configuration: sequences at once, tokens a step, KV blocks (None: the engine's pool), TPOT target."""

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_blocks: int | None = None
    step_slo_ms: float | None = None


@dataclass
class Measured:
    point: Point
    throughput: float  # output tokens per second, prefill included
    tpot_s: float  # mean over requests of (last token - first token) / (tokens - 1)
    ttft_s: float  # mean
    seconds: float
    preemptions: int
    steps: list[StepSample] = field(default_factory=list, repr=False)


def run_point(
    engine: LLMEngine, point: Point, prompt_len: int, output_len: int, num_requests: int, seed: int = 0
) -> Measured:
    """Run `num_requests` random prompts of `prompt_len` tokens, each generating exactly `output_len` (EOS
    ignored, greedy), all queued at once, with the engine set to `point`; its settings are restored after."""
    sched, bm = engine.scheduler, engine.block_manager
    if engine.has_unfinished_requests() or bm.num_free_blocks != bm.num_blocks:
        raise RuntimeError("run_point needs an idle engine")
    saved = (sched.max_num_seqs, sched.max_num_batched_tokens, sched.step_target_s, bm.enable_prefix_caching)
    held = [bm.free_ids.popleft() for _ in range(max(0, bm.num_blocks - (point.kv_blocks or bm.num_blocks)))]
    sched.max_num_seqs, sched.max_num_batched_tokens = point.max_num_seqs, point.max_num_batched_tokens
    sched.step_target_s = point.step_slo_ms / 1000 if point.step_slo_ms else None
    bm.enable_prefix_caching = False  # random prompts: nothing to share, and it keeps the held blocks apart
    preempted = sched.num_preemptions
    rng, vocab = random.Random(seed), engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    steps: list[StepSample] = []
    try:
        start = time.perf_counter()
        for i in range(num_requests):
            engine.add_request(f"tune-{seed}-{i}", [rng.randrange(vocab) for _ in range(prompt_len)], params, 0, start)
        recent = engine.costs.recent
        while engine.has_unfinished_requests():
            before = recent[-1] if recent else None
            outputs = engine.step()
            now = time.perf_counter()
            if recent and recent[-1] is not before:
                steps.append(recent[-1])
            for out in outputs:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
        seconds = time.perf_counter() - start
    finally:
        sched.max_num_seqs, sched.max_num_batched_tokens, sched.step_target_s, bm.enable_prefix_caching = saved
        bm.free_ids.extendleft(reversed(held))
    tpot = statistics.fmean((last[r] - first[r]) / max(1, output_len - 1) for r in first)
    ttft = statistics.fmean(t - start for t in first.values())
    return Measured(
        point, num_requests * output_len / seconds, tpot, ttft, seconds, sched.num_preemptions - preempted, steps
    )

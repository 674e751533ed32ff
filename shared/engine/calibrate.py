"""The engine measuring its own steps: random prompts of given lengths, alone or as decode batches, each step
kept as a StepSample (shared/engine/load.py).

`xllm profile` runs a large grid and saves it. A worker started without a profile runs `QUICK` before it
serves (a second or two), so its step-cost fit covers both kinds of step from the start: a prefill worker
never decodes and a decode worker seldom prefills, and a fit of one kind of step alone would price the other
by extrapolation. The prefix cache is off meanwhile: random prompts would only fill it, and announce blocks
nobody will ask for.
"""

import itertools
import random

from shared.cost_model import StepSample
from shared.engine.llm_engine import LLMEngine
from shared.engine.sampling_params import SamplingParams

# Prompt lengths alone; decode runs as (batch, prompt length, tokens to generate).
QUICK = ((16, 128, 512), ((1, 64, 4), (8, 64, 4)))
_ids = itertools.count()


def measure(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int, rng: random.Random) -> list[StepSample]:
    """Run `batch` random prompts of `prompt_len` tokens to `max_tokens` tokens each (EOS ignored); the steps."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        engine.validate(prompt, params)
        engine.add_request(f"calibrate-{next(_ids)}", prompt, params)
    recent, steps = engine.costs.recent, []
    while engine.has_unfinished_requests():
        last = recent[-1] if recent else None
        engine.step()
        if recent and recent[-1] is not last:  # read at once: the deque drops old samples
            steps.append(recent[-1])
    return steps


def calibrate(engine: LLMEngine, grid: tuple = QUICK, seed: int = 0) -> list[StepSample]:
    """Measure `grid` (prompt lengths alone, decode runs) after a warm-up, and make the samples the engine's prior."""
    rng, caching = random.Random(seed), engine.block_manager.enable_prefix_caching
    lengths, decodes = grid
    longest = engine.max_model_len - 8
    engine.block_manager.enable_prefix_caching = False
    try:
        measure(engine, 1, min(32, longest), 2, rng)  # warm-up: first calls, allocator, caches
        samples = [s for n in lengths for s in measure(engine, 1, min(n, longest), 1, rng)]
        for batch, prompt_len, tokens in decodes:
            batch = min(batch, engine.scheduler.max_num_seqs)
            samples += measure(engine, batch, min(prompt_len, longest - tokens), tokens, rng)
    finally:
        engine.block_manager.enable_prefix_caching = caching
    engine.costs.seed(samples)
    return samples

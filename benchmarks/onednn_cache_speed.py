"""Decode throughput under a given oneDNN primitive-cache size: does capping it (shared/engine/ops.py) slow
batched decoding? The engine in-process, batches of 16, 32 and 24 requests (30-90 prompt tokens, 64 out).

    PYTHONPATH=. python benchmarks/onednn_cache_speed.py 64      # then 1024 (oneDNN's default), alternating
"""

import os
import random
import sys
import time
import uuid

import torch  # noqa: F401 -- loaded before the cache size is set: oneDNN reads it at its first matmul


def main() -> None:
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = sys.argv[1]
    from shared.engine.config import EngineConfig
    from shared.engine.llm_engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model="smollm2", kv_cache_memory=512 << 20, num_threads=2))
    rng = random.Random(1)

    def tokens_per_second(batch: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for _ in range(batch):
            prompt = [rng.randrange(1000, 40000) for _ in range(rng.randint(30, 90))]
            engine.add_request(uuid.uuid4().hex, prompt, params)
        start, tokens = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            tokens += sum(len(seq.token_ids) for out in engine.step() for seq in out.outputs)
        return tokens / (time.perf_counter() - start)

    tokens_per_second(4)  # warm-up
    print(f"cache {sys.argv[1]}: tok/s at batch 16, 32, 24:", [round(tokens_per_second(b)) for b in (16, 32, 24)])


if __name__ == "__main__":
    main()

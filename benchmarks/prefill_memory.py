"""A prefill worker's memory, without the service around it: the engine alone prefills prompts of every
length from 20 to 300 tokens (as a prefill worker sees them), and its anonymous RSS is printed as it goes.

    PYTHONPATH=. python benchmarks/prefill_memory.py [--requests 400] [--onednn-cache 64]

`--onednn-cache N` sets ONEDNN_PRIMITIVE_CACHE_CAPACITY before the first matmul (the engine defaults it to
64; oneDNN's own default is 1024): oneDNN keeps a compiled primitive per matmul shape, and a prefill step's
shape is its token count.
"""

import argparse
import os
import random
import time
import uuid

import torch  # noqa: F401 -- loaded before the cache size is set: oneDNN reads it at its first matmul


def anon_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--onednn-cache", type=int, default=64)
    args = parser.parse_args()
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)

    from shared.engine.config import EngineConfig
    from shared.engine.llm_engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model="smollm2", kv_cache_memory=256 << 20, num_threads=1))
    rng, params = random.Random(0), SamplingParams(temperature=0, max_tokens=1)
    print(f"oneDNN primitive cache {args.onednn_cache}: start {anon_mib()} MiB anonymous", flush=True)
    started = time.perf_counter()
    for i in range(1, args.requests + 1):
        prompt = [rng.randrange(1000, 40000) for _ in range(rng.randint(20, 300))]
        engine.add_request(uuid.uuid4().hex, prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        if i % 50 == 0:
            print(f"{i:5d} prompts: {anon_mib()} MiB ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

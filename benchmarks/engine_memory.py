"""A worker engine's resident memory with the default model, and how much of it is the KV pool.

    PYTHONPATH=. python benchmarks/engine_memory.py --quantization auto   # or none

Loads SmolLM2 as `xllm serve` would (EngineConfig defaults: the KV pool sized from free memory), runs 4 short
requests, and prints the process's RSS, its peak, and the KV pool's size.
"""

import argparse
import resource
from pathlib import Path

import torch

from shared.engine.config import QUANTIZATIONS, EngineConfig
from shared.engine.llm import LLM
from shared.engine.loader import load_checkpoint
from shared.engine.quant import plan
from shared.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="auto")
    args = parser.parse_args()
    keep_blocks, _ = plan(args.quantization, torch.device("cpu"), torch.float32)
    llm = LLM(
        EngineConfig(model="smollm2", quantization=args.quantization),
        load_checkpoint("smollm2", keep_blocks=keep_blocks),
    )
    llm.generate([[1] * 200] * 4, SamplingParams(max_tokens=16))
    rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) >> 10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    runner = llm.engine.runner
    kv = (runner.k_cache.nbytes + runner.v_cache.nbytes) >> 20
    print(f"--quantization {args.quantization}: RSS {rss} MiB, peak {peak} MiB, KV pool {kv} MiB")


if __name__ == "__main__":
    main()

"""Where an engine run's time goes: wall time of each model op (ops.*, paged attention) summed over one
`LLM.generate` of the `xllm bench engine` workload, next to the run's total.

    PYTHONPATH=. python benchmarks/step_breakdown.py [--batch 32] [--threads 2] [--quantization auto]

Timers wrap the Python functions, so each op's figure includes its dispatch; "rest" is everything else
(the scheduler, building each step's inputs, sampling, the embedding and Python between ops).
"""

import argparse
import collections
import random
import time

import torch

from shared.engine import model, ops
from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.quant import plan
from shared.engine.sampling_params import SamplingParams

TIMED = [
    (ops, "linear"),
    (ops, "quantized_linear"),
    (ops, "rms_norm"),
    (ops, "add_rms_norm_"),
    (ops, "silu_and_mul"),
    (ops, "rotary_and_cache"),
    (model, "paged_attention"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default="auto", help="as xllm serve's --quantization")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_blocks, _ = plan(args.quantization, torch.device("cpu"), torch.float32)
    ckpt = load_checkpoint("smollm2", keep_blocks=keep_blocks)
    token_bytes = ModelRunner.block_bytes(ckpt.config, 1, torch.float32)
    llm = LLM(
        EngineConfig(
            model="smollm2",
            num_threads=args.threads,
            max_num_seqs=max(args.batch, 1),
            kv_cache_memory=token_bytes * (args.input_len + args.output_len + 32) * args.batch,
            enable_prefix_caching=False,
            quantization=args.quantization,
        ),
        ckpt,
    )
    llm.generate([[1] * 16], SamplingParams(max_tokens=4))  # warm-up
    spent: dict[str, float] = collections.defaultdict(float)
    for module, name in TIMED:
        wrap(module, name, spent)
    rng = random.Random(0)
    prompts = [[rng.randrange(ckpt.config.vocab_size) for _ in range(args.input_len)] for _ in range(args.batch)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True))
    total = time.perf_counter() - start
    print(f"batch {args.batch}: {args.batch * args.output_len / total:.1f} output tok/s, {total:.2f} s")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{name:>18} {seconds:7.2f} s {100 * seconds / total:5.1f} %")
    rest = total - sum(spent.values())
    print(f"{'rest':>18} {rest:7.2f} s {100 * rest / total:5.1f} %")


def wrap(module, name: str, spent: dict[str, float]) -> None:
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    setattr(module, name, timed)


if __name__ == "__main__":
    main()

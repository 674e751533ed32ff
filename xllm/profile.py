"""`xllm profile`: what this engine's steps cost on this machine, saved for the router's cost model.

Runs the engine in-process on random prompts (greedy, EOS ignored, so every length is exact) and keeps each
step it measures: a StepSample of sequences, tokens, prompt attention (sum of chunk tokens x context), the
context its decodes hold, and seconds (shared/cost_model.py). The grid, after a warm-up that is not kept:

- prefills alone: one prompt of each length 16 ... 2048 (longer than --max-num-batched-tokens: chunked);
- decode batches: B prompts of C tokens for B in 1 ... 64 and C in 64, 512, 2048 (B x C <= 8192), each
  generating enough tokens that the whole batch decodes for a few steps after its prompts are in; the
  steps while some prompts are still prefilling are kept too (mixed steps).

It prints the fitted coefficients, the fit's relative error over the steps and predicted vs measured seconds
for a few shapes, and writes the samples and the fit to --output. Give that file to the workers, which
seed their online fit with its samples so the router predicts TTFT and TPOT before they have run:
`xllm up --cost-profile FILE`, or `--cost-profile FILE` on `xllm serve prefill|decode|colocated`.
Profile with the device, dtype, threads and token budget the workers will run with.
"""

import argparse
import itertools
import random
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from shared.cost_model import CostModel, StepSample, fit, relative_errors, save_profile
from shared.engine.calibrate import measure
from shared.engine.config import EngineConfig
from shared.engine.errors import InvalidRequestError
from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.system import DTYPES, default_dtype

PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (64, 512, 2048)
QUICK_PREFILL_LENGTHS, QUICK_BATCH_SIZES, QUICK_CONTEXTS = (16, 64, 256), (1, 4), (32, 128)
MAX_BATCH_TOKENS = 8192  # decode grid: B x C at most this (prefilling the prompts is most of the run's time)
DECODE_STEPS = 4  # steps with the whole batch decoding, per (B, C)
PREFILL_REPEATS = 2  # runs of each prefill length (1 with --quick)
REPORT = (("prefill", 128), ("prefill", 1024), ("decode", 1, 512), ("decode", 16, 512))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xllm profile", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    p.add_argument("--num-threads", type=positive, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-num-batched-tokens", type=positive, default=2048)
    p.add_argument("--max-num-seqs", type=positive, default=64)
    p.add_argument("--max-model-len", type=positive, default=None, help="default: the model's context length")
    p.add_argument("--output", default="cost-profile.json")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds): for tests")
    p.add_argument("--seed", type=int, default=0)
    return p


def plan(args: argparse.Namespace, max_model_len: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Prefill lengths, and decode runs as (batch, context, max_tokens), capped by the model and the options."""
    lengths = QUICK_PREFILL_LENGTHS if args.quick else PREFILL_LENGTHS
    batches = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
    contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    prefills = sorted({min(n, max_model_len - 8) for n in lengths})
    decodes = {}
    for b, c in itertools.product(sorted({min(b, args.max_num_seqs) for b in batches}), contexts):
        if b * c > MAX_BATCH_TOKENS:
            continue
        max_tokens = -(-b * c // args.max_num_batched_tokens) + DECODE_STEPS  # prefill steps, then decode ones
        decodes[b, min(c, max_model_len - max_tokens)] = max_tokens
    return prefills, [(b, c, t) for (b, c), t in decodes.items()]


class Profiler:
    """Drives an engine directly and keeps the StepSample of every step that ran something."""

    def __init__(self, engine: LLMEngine, seed: int):
        self.engine, self.rng = engine, random.Random(seed)
        self.samples: list[StepSample] = []
        self.shapes: dict[tuple, list[StepSample]] = {}  # ("prefill", n) / ("decode", B, C) -> its exact steps

    def run(self, batch: int, prompt_len: int, max_tokens: int, keep: bool = True) -> list[StepSample]:
        steps = measure(self.engine, batch, prompt_len, max_tokens, self.rng)
        if keep:
            self.samples += steps
        return steps

    def prefill(self, n: int) -> None:
        steps = self.run(1, n, 1)
        self.shapes.setdefault(("prefill", n), []).extend(s for s in steps if s.seqs == 1 and s.tokens == n)

    def decode(self, batch: int, context: int, max_tokens: int) -> None:
        steps = self.run(batch, context, max_tokens)
        self.shapes.setdefault(("decode", batch, context), []).extend(s for s in steps if s.seqs == s.tokens == batch)


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, list[int], list[tuple[int, int, int]]]:
    """The engine, with KV room for the largest run of the grid, and the grid (`plan`)."""
    dtype = default_dtype(args.dtype, torch.device(args.device))
    ckpt = load_checkpoint(args.model)
    context = min(args.max_model_len or ckpt.config.max_position_embeddings, ckpt.config.max_position_embeddings)
    if context < 64:
        raise ValueError(f"a context of {context} tokens is too short to profile (64 at least)")
    prefills, decodes = plan(args, context)
    size = EngineConfig().block_size
    blocks = max([-(-(n + 1) // size) for n in prefills] + [b * -(-(c + t) // size) for b, c, t in decodes])
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        num_threads=args.num_threads,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,
        kv_cache_memory=(blocks + 16) * ModelRunner.block_bytes(ckpt.config, size, dtype),
    )
    return LLMEngine(config, ckpt), prefills, decodes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        engine, prefills, decodes = build_engine(args)
    except (FileNotFoundError, ValueError, RuntimeError, InvalidRequestError) as e:
        print(f"xllm profile: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    profiler = Profiler(engine, args.seed)
    short = min(128, engine.max_model_len - 8)
    profiler.run(1, short, 4, keep=False)  # warm-up: first calls, allocator, caches
    profiler.run(min(4, args.max_num_seqs), min(64, short), 4, keep=False)
    for n in prefills:
        for _ in range(1 if args.quick else PREFILL_REPEATS):
            profiler.prefill(n)
    for b, c, t in decodes:
        profiler.decode(b, c, t)
    engine.close()
    meta = {
        "model": args.model,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "num_threads": torch.get_num_threads(),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": engine.max_model_len,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["xllm", "profile", *argv]),
    }
    save_profile(args.output, profiler.samples, meta)
    print(
        f"xllm profile: {meta['model']}  {meta['device']} {meta['dtype']}  threads {meta['num_threads']}  "
        f"budget {args.max_num_batched_tokens} tokens; {len(profiler.samples)} steps in "
        f"{time.perf_counter() - started:.0f} s -> {args.output}"
    )
    print_report(fit(profiler.samples), profiler)
    return 0


def print_report(model: CostModel | None, profiler: Profiler) -> None:
    if model is None:
        print("too few steps to fit a cost model")
        return
    print(
        "step seconds = c_step + c_seq x seqs + c_token x tokens + c_attention x sum(prompt chunk x its context)"
        " + c_context x decode context"
    )
    for name, scale, unit in (
        ("step", 1, "step"),
        ("seq", 1, "seq"),
        ("token", 1, "token"),
        ("attention", 1000, "1000 attention"),
        ("context", 1000, "1000 decode context tokens"),
    ):
        print(f"  {getattr(model, name) * scale * 1e3:10.4f} ms per {unit}")
    errors = sorted(relative_errors(model, profiler.samples))
    p90 = errors[min(len(errors) - 1, int(0.9 * len(errors)))]
    print(f"relative error over the steps: median {statistics.median(errors):.1%}, p90 {p90:.1%}")
    print(f"  {'shape':<22}{'predicted':>10}{'measured':>10}")
    for shape in REPORT:
        steps = profiler.shapes.get(shape)
        if not steps:
            continue
        label = f"prefill {shape[1]}" if shape[0] == "prefill" else f"decode B={shape[1]} C={shape[2]}"
        predicted = statistics.median(model.predict(s) for s in steps)
        measured = statistics.median(s.seconds for s in steps)
        print(f"  {label:<22}{predicted * 1e3:>8.2f}ms{measured * 1e3:>8.2f}ms")

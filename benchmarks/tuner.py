"""`xllm tune`'s choice against the defaults and against a brute-force grid of real runs, on this machine.

    PYTHONPATH=. python benchmarks/tuner.py --tpot-slo-ms 100 --memory 1000000000

1. Runs `xllm tune` in-process for the workload (its profile, its choice, its verification runs), timed.
2. Measures, with one engine and the same closed batch of requests for every configuration (xllm/tune/measure.py):
   the tuner's configuration (its budget adapted online under its TPOT target, as workers run it), the defaults
   (max_num_seqs 64, max_num_batched_tokens 2048) and every point of a grid of max_num_seqs x token budget, each
   with the KV pool the same --memory leaves after the weights and activations.
3. Prints a table: throughput and mean TPOT of each, which meet the target, the grid's best within the target,
   the tuner's throughput as a share of it and its runs and seconds against the grid's.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.model_runner import ModelRunner
from xllm.tune.cli import activation_bytes, weights_bytes
from xllm.tune.cli import main as tune
from xllm.tune.measure import Measured, Point, run_point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--requests", type=int, default=48, help="requests of every run (the same for all)")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--memory", type=int, default=1_000_000_000, help="bytes for weights, activations and KV")
    p.add_argument("--grid-seqs", default="8,16,24,32,48")
    p.add_argument("--grid-tokens", default="128,512,2048")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p


def kv_blocks(engine: LLMEngine, memory: int, tokens: int, seqs: int, weights: int) -> int:
    """KV blocks --memory leaves beside the weights and the activations of a step of `tokens` (tune's estimate)."""
    cfg = engine.model_config
    per_token, per_seq = activation_bytes(cfg, engine.dtype)
    act = per_token * tokens + per_seq * seqs
    block = ModelRunner.block_bytes(cfg, engine.config.block_size, engine.dtype)
    return max(1, (memory - weights - act) // block)


def main() -> int:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp()) / "tuned.json"
    shape = ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    started = time.perf_counter()
    code = tune(
        [
            *("--tpot-slo-ms", str(args.tpot_slo_ms), "--memory", str(args.memory), "--model", args.model),
            *("--num-threads", str(args.threads), "--output", str(out)),
            *("--max-num-seqs", "64", "--max-num-batched-tokens", "2048", *shape),
        ]
    )
    tune_seconds = time.perf_counter() - started
    if code:
        return code
    tuned = json.loads(out.read_text())
    up, tune_runs = tuned["up"], len(tuned["tune"]["runs"])
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            num_threads=args.threads,
            enable_prefix_caching=False,
            kv_cache_memory=args.memory,
            max_num_seqs=64,
        )
    )
    weights = weights_bytes(engine)
    run_point(engine, Point(4, 256), 32, 4, 4)  # warm-up

    def measure(seqs: int, tokens: int, slo_ms: float | None = None, blocks: int | None = None) -> Measured:
        blocks = blocks or kv_blocks(engine, args.memory, tokens, seqs, weights)
        point = Point(seqs, tokens, blocks, slo_ms)
        return run_point(engine, point, args.prompt_len, args.output_len, args.requests, seed=seqs * 10_000 + tokens)

    block = ModelRunner.block_bytes(engine.model_config, engine.config.block_size, engine.dtype)
    rows = [
        (
            "tuner",
            measure(
                up["max_num_seqs"], up["max_num_batched_tokens"], up["step_slo_ms"], up["kv_cache_memory"] // block
            ),
        )
    ]
    rows.append(("defaults", measure(64, 2048)))
    grid_started = time.perf_counter()
    grid = [
        ("grid", measure(b, t))
        for b in map(int, args.grid_seqs.split(","))
        for t in map(int, args.grid_tokens.split(","))
    ]
    grid_seconds = time.perf_counter() - grid_started
    report(rows + grid, args, tune_runs, tune_seconds, grid_seconds)
    if args.json:
        data = [
            {
                "kind": k,
                **vars(m.point),
                "tok_s": m.throughput,
                "tpot_ms": m.tpot_s * 1e3,
                "preemptions": m.preemptions,
                "seconds": m.seconds,
            }
            for k, m in rows + grid
        ]
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


def report(rows: list[tuple[str, Measured]], args, tune_runs: int, tune_seconds: float, grid_seconds: float) -> None:
    slo = args.tpot_slo_ms / 1000
    print(
        f"\n{args.prompt_len} in / {args.output_len} out, {args.requests} requests a run, TPOT target "
        f"{args.tpot_slo_ms:g} ms, memory {args.memory >> 20} MiB, {args.threads} threads"
    )
    print("| config | max_num_seqs | token budget | KV blocks | output tok/s | mean TPOT ms | preemptions | meets |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for kind, m in rows:
        p = m.point
        budget = f"{p.max_num_batched_tokens}" + (" (adaptive)" if p.step_slo_ms else "")
        meets = "yes" if m.tpot_s <= slo else "no"
        print(
            f"| {kind} | {p.max_num_seqs} | {budget} | {p.kv_blocks} | {m.throughput:.1f} | {m.tpot_s * 1e3:.1f} "
            f"| {m.preemptions} | {meets} |"
        )
    within = [m for kind, m in rows if kind == "grid" and m.tpot_s <= slo]
    tuner = rows[0][1]
    grid_runs = sum(kind == "grid" for kind, _ in rows)
    if not within:
        print("no grid point meets the target")
        return
    best = max(within, key=lambda m: m.throughput)
    print(
        f"\ngrid best within the target: max_num_seqs {best.point.max_num_seqs}, budget "
        f"{best.point.max_num_batched_tokens}: {best.throughput:.1f} tok/s"
    )
    print(
        f"tuner: {tuner.throughput / best.throughput:.1%} of it ({'meets' if tuner.tpot_s <= slo else 'misses'} "
        f"the target); {tune_runs} workload runs + a profile in {tune_seconds:.0f} s against the grid's "
        f"{grid_runs} runs in {grid_seconds:.0f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""The second KV tier against recompute-only, side by side in one run, in one engine process (default model).

    PYTHONPATH=. python benchmarks/kv_tier.py [--threads 2] [--quick] [--only shared|preemption|media] [--host-path DIR]

Workloads (greedy, EOS ignored; a closed loop keeps `concurrency` requests in flight; both configurations get the
same pool, the tier run a second tier big enough for the working set; each configuration runs twice, A B B A):
  shared prefixes  8 system prompts of 1024 tokens, taken in turn by 24 requests (prompt + 32 own tokens, 16 out,
                   4 in flight), on a pool with room for about 3 of them: recompute-only keeps missing
  preemption       16 prompts of 1024 tokens, 64 out, all at once, on a pool with room for 4 prompts and a
                   block more each: the decodes' growth preempts the latest admitted, which come back later
Then what chose the tier's medium: the measured seconds to copy a block down and up (the memory-mapped file; and
down into pages of it never written before),
to quantize it to int8 per token and back, to recompute it (the engine's step-cost model), and whether int8 KV
changes greedy output (prompts whose 32 greedy tokens differ after their prompt's KV went through int8).
"""

import argparse
import random
import time
from collections import deque

import torch

from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.sampling_params import SamplingParams


def drive(engine: LLMEngine, prompts: list[list[int]], out_len: int, concurrency: int) -> dict:
    """Run every prompt with at most `concurrency` in flight; throughput, TTFT and the pool's figures."""
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    pending, added, ttft, tokens = deque(enumerate(prompts)), {}, {}, 0
    started = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(added) < concurrency:  # `added`: in flight
            i, prompt = pending.popleft()
            engine.add_request(str(i), prompt, params)
            added[str(i)] = time.perf_counter()
        for out in engine.step():
            tokens += sum(len(o.token_ids) for o in out.outputs)
            ttft.setdefault(out.request_id, time.perf_counter() - added[out.request_id])
            if out.finished:
                del added[out.request_id]
    elapsed = time.perf_counter() - started
    stats = engine.stats()
    ttfts = sorted(ttft.values())
    return {
        "tok/s": tokens / elapsed,
        "seconds": elapsed,
        "ttft mean": sum(ttfts) / len(ttfts),
        "ttft p90": ttfts[int(0.9 * (len(ttfts) - 1))],
        "prefix hits": stats["prefix_hits"] / max(1, stats["prefix_queries"]),
        "preemptions": stats["preemptions"],
        "swapped in": stats.get("kv_swapped_in_blocks", 0),
        "swapped out": stats.get("kv_swapped_out_blocks", 0),
        "copying s": stats.get("kv_swap_in_seconds", 0.0) + stats.get("kv_swap_out_seconds", 0.0),
    }


def engine(args, ckpt, pool_blocks: int, host_blocks: int) -> LLMEngine:
    block_bytes = ModelRunner.block_bytes(ckpt.config, 16, torch.float32)
    config = EngineConfig(
        model=args.model,
        num_threads=args.threads,
        kv_cache_memory=pool_blocks * block_bytes,
        kv_host_memory=host_blocks * block_bytes or None,
        kv_host_path=args.host_path,
    )
    built = LLMEngine(config, ckpt)
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rng = random.Random(99)
    for i, n in enumerate((16, 64, 256, 512, 64, 16, 128, 32, 256, 8)):  # fits the cost model (8 steps or more)
        built.add_request(f"warm{i}", [rng.randrange(100, 40000) for _ in range(n)], warm)
        while built.has_unfinished_requests():
            built.step()
    return built


def compare(name: str, args, ckpt, prompts: list[list[int]], out_len: int, concurrency: int, pool: int, host: int):
    """Recompute-only and the tier, each run twice in the order A B B A (the machine's drift hits both alike)."""
    runs = []
    for label, host_blocks in (
        ("recompute-only", 0),
        ("second tier", host),
        ("second tier", host),
        ("recompute-only", 0),
    ):
        runs.append((label, drive(engine(args, ckpt, pool, host_blocks), prompts, out_len, concurrency)))
    print(f"\n{name}")
    keys = list(runs[0][1])
    print(f"{'':>15}" + "".join(f"{k:>13}" for k in keys))
    for label, r in runs:
        print(f"{label:>15}" + "".join(f"{r[k]:>13.3f}" if isinstance(r[k], float) else f"{r[k]:>13}" for k in keys))

    def mean(label: str, key: str) -> float:
        return sum(r[key] for run_label, r in runs if run_label == label) / 2

    throughput = mean("second tier", "tok/s") / mean("recompute-only", "tok/s")
    ttft = mean("second tier", "ttft mean") / mean("recompute-only", "ttft mean")
    print(f"tier / recompute-only (means of two runs each): throughput {throughput:.2f}x, mean TTFT {ttft:.2f}x")


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """KV quantized to int8 with a scale per token and head, and back."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return (x / scale).round().clamp(-127, 127).to(torch.int8).float() * scale


def down_seconds(tier, slots: range) -> float:
    """Seconds per block to copy pool block 1 down into each of these tier slots."""
    started = time.perf_counter()
    for slot in slots:
        tier.data[slot, 0], tier.data[slot, 1] = tier.k_cache[:, 1], tier.v_cache[:, 1]
    return (time.perf_counter() - started) / len(slots)


def media(args, ckpt, prompts: list[list[int]], out_len: int) -> None:
    """Copy vs int8 vs recompute seconds per block, and int8 KV's effect on greedy output."""
    llm = engine(args, ckpt, pool_blocks=512, host_blocks=1024)
    tier = llm.block_manager.tier
    scratch = llm.runner.k_cache[:, 1:9].clone()  # 8 blocks' worth of K
    started = time.perf_counter()
    for _ in range(20):
        int8_roundtrip(scratch)
    int8_seconds = 2 * (time.perf_counter() - started) / 20 / 8  # K and V, per block
    recompute = llm.costs.model.prefill_work(16, 512)
    first, again = (down_seconds(tier, range(1, 1024)) for _ in range(2))  # slot 0 was the tier's own measurement's
    print("\nper block of 16 tokens (all layers, K and V):")
    print(f"  copy down + up (file tier, measured): {1e3 * (tier.out_per_block + tier.in_per_block):.3f} ms")
    print(f"  copy down into file pages never written: {1e3 * first:.3f} ms (the same pages again: {1e3 * again:.3f})")
    print(f"  int8 quantize + dequantize:           {1e3 * int8_seconds:.3f} ms (the copies on top)")
    print(f"  recompute at position 512 (cost model): {1e3 * recompute:.3f} ms")
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    differ = 0
    for i, prompt in enumerate(prompts):
        llm.add_request(f"exact{i}", prompt, params)
        exact = []
        while llm.has_unfinished_requests():
            exact += [t for out in llm.step() for o in out.outputs for t in o.token_ids]
        llm.add_request(f"int8-{i}", prompt, params)
        lossy = [t for out in llm.step() for o in out.outputs for t in o.token_ids]  # the prompt, its first token
        seq = llm.requests[f"int8-{i}"].seqs[0]
        blocks = torch.tensor(seq.block_table)
        for cache in (llm.runner.k_cache, llm.runner.v_cache):
            cache[:, blocks] = int8_roundtrip(cache[:, blocks])
        while llm.has_unfinished_requests():
            lossy += [t for out in llm.step() for o in out.outputs for t in o.token_ids]
        differ += lossy != exact
    print(f"  int8 KV changed greedy output of {differ} of {len(prompts)} prompts ({out_len} tokens each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="half the requests (a smoke run)")
    parser.add_argument("--host-path", help="the directory of the tier's file (default: the temp directory)")
    parser.add_argument("--only", choices=("shared", "preemption", "media"), help="one part only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    scale = 2 if args.quick else 1
    prefixes = [tokens(1024) for _ in range(8)]
    shared = [prefixes[i % 8] + tokens(32) for i in range(24 // scale)]
    long = [tokens(1024) for _ in range(16 // scale)]
    print(f"model {ckpt.config.name}, fp32, {args.threads} threads; recompute-only vs a second tier, same pool")
    if args.only in (None, "shared"):
        title = f"shared prefixes ({len(shared)} requests over 8 x 1024 tokens, pool for ~3)"
        compare(title, args, ckpt, shared, 16, 4, pool=3 * 66 + 8, host=1024)
    if args.only in (None, "preemption"):
        title = f"preemption ({len(long)} x 1024 tokens + 64 out, pool for 4 prompts and a block each)"
        compare(title, args, ckpt, long, 64, len(long), pool=4 * 64 + 4, host=1280)
    if args.only in (None, "media"):
        media(args, ckpt, [tokens(256) for _ in range(8 // scale)], 32)


if __name__ == "__main__":
    main()

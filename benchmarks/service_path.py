"""The cost of the service path: the same load through `xllm up` and through the in-process engine.

    PYTHONPATH=. python benchmarks/service_path.py [--concurrency 32] [--modes colocated,disaggregated]

Throughput: all requests arrive at once (`--concurrency` of them), `--input-len` words in (one token
each, plus BOS), `--output-len` tokens out, EOS ignored, greedy, as /v1/completions streams. In-process,
the same texts are tokenized as the gateway tokenizes them and run through the AsyncEngine that workers
use. Under that load TTFT is mostly queueing behind other prompts' prefill, so the added TTFT of the
service path is measured apart too, on a request alone: `--sequential` pairs, each an in-process
request and a service request of the same length back to back (a different text each, so no prefix
cache helps), at `--input-len` tokens and at a few (5); "added" is the median of the pairs'
differences, which cancels the machine's drift.
"""

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from services.worker.async_engine import AsyncEngine
from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from xllm.bench.client import Target
from xllm.bench.local_system import start_system, stop_system
from xllm.bench.metrics import summarize
from xllm.bench.runner import LoadPoint, run_load
from xllm.bench.workloads import WorkloadSpec, generate


async def in_process(runner: AsyncEngine, texts: list[str], output_len: int) -> dict:
    ids = [runner.engine.tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    await _one(runner, "warmup", ids[0][:16], SamplingParams(max_tokens=2), time.perf_counter())
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(runner, f"r{i}", p, params, start) for i, p in enumerate(ids)))
    duration = time.perf_counter() - start
    return {
        "output_throughput": sum(n for _, n in results) / duration,
        "ttft_p50_ms": statistics.median(t for t, _ in results) * 1000,
    }


async def ttft_pairs(runner: AsyncEngine, url: str, texts: list[str]) -> dict:
    """Per text, TTFT in-process then through the service; medians and the median difference, in ms."""
    from xllm.bench.client import send
    from xllm.bench.workloads import BenchRequest

    target = Target(url, "smollm2", endpoint="completions")
    local, served = [], []
    async with aiohttp.ClientSession() as session:
        for i, text in enumerate(texts):
            ids = runner.engine.tokenizer.encode(f"x{i} {text}")
            local.append((await _one(runner, f"alone{i}", ids, SamplingParams(max_tokens=2), time.perf_counter()))[0])
            result = await send(session, target, BenchRequest(f"y{i} {text}", 2, len(text.split())))
            assert result.ok and result.ttft is not None, (result.error, result.detail)
            served.append(result.ttft)
    ms = 1000
    return {
        "local": statistics.median(local) * ms,
        "served": statistics.median(served) * ms,
        "added": statistics.median(s - t for s, t in zip(served, local)) * ms,
    }


async def _one(runner: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams, start: float):
    ttft, tokens = None, 0
    async for out in runner.generate(rid, prompt, params):
        n = sum(len(d.token_ids) for d in out.outputs)
        if n and ttft is None:
            ttft = time.perf_counter() - start
        tokens += n
    return ttft, tokens


async def through_service(url: str, texts: list[str], output_len: int, concurrency: int) -> dict:
    from xllm.bench.workloads import BenchRequest

    target = Target(url, "smollm2", endpoint="completions", ignore_eos=True)
    reqs = [BenchRequest(t, output_len, len(t.split())) for t in texts]
    warmup = [BenchRequest("hello there", 2, 2)]
    run = await run_load(target, reqs, LoadPoint(max_concurrency=concurrency), seed=0, warmup=warmup, progress=False)
    s = summarize(run.results, run.duration_s, {})
    assert s["failed"] == 0, s["error_examples"]
    return {"output_throughput": s["output_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"]}


async def run(args: argparse.Namespace, texts: list[str]) -> list[tuple[str, dict]]:
    engine = LLMEngine(
        EngineConfig(model="smollm2", num_threads=args.threads, kv_cache_memory=1 << 30, enable_prefix_caching=False)
    )
    runner = AsyncEngine(engine)
    await runner.start()
    rows = [("in-process engine", await in_process(runner, texts, args.output_len))]
    threads = dict(kv.split("=") for kv in args.worker_threads.split(",")) if args.worker_threads else {}
    short = [" ".join(t.split()[:3]) for t in texts]
    for mode in args.modes.split(","):
        state = Path(tempfile.mkdtemp(prefix=f"xllm-bench-{mode}-"))
        extra = ["--worker-threads", threads[mode]] if mode in threads else []
        system = start_system(state, "--mode", mode, "--kv-cache-fraction", "0.05", *extra)
        try:
            row = await through_service(system.url, texts, args.output_len, args.concurrency)
            row["alone"] = await ttft_pairs(runner, system.url, texts[: args.sequential])
            row["alone_short"] = await ttft_pairs(runner, system.url, short[: args.sequential])
            rows.append((f"xllm up --mode {mode}", row))
        finally:
            stop_system(system.proc)
    await runner.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in-process (the machine's cores)")
    parser.add_argument("--sequential", type=int, default=16, help="request pairs sent one at a time for TTFT")
    parser.add_argument("--modes", default="colocated,disaggregated")
    parser.add_argument("--worker-threads", default=None, help="per mode, e.g. disaggregated=1 (default: launcher's)")
    args = parser.parse_args()
    spec = WorkloadSpec(input_len=args.input_len - 1, output_len=args.output_len)  # BOS makes it input_len
    texts = [r.prompt for r in generate(spec, args.concurrency, seed=0, salt_rng=random.Random(1))]
    rows = asyncio.run(run(args, texts))
    base = rows[0][1]
    print(f"{args.concurrency} concurrent streams, {args.input_len} in / {args.output_len} out, EOS ignored")
    print(f"{'path':<28} {'out tok/s':>10} {'ratio':>6} {'TTFT p50 ms':>12}")
    for name, r in rows:
        print(
            f"{name:<28} {r['output_throughput']:>10.1f} "
            f"{r['output_throughput'] / base['output_throughput']:>5.2f}x {r['ttft_p50_ms']:>12.0f}"
        )
    print(f"\na request alone, {args.sequential} pairs: TTFT p50 in-process / through the service / added (ms)")
    for name, r in rows[1:]:
        cells = [f"{p['local']:.1f} / {p['served']:.1f} / {p['added']:+.1f}" for p in (r["alone"], r["alone_short"])]
        print(f"{name:<28} {args.input_len} tokens: {cells[0]:<24} a few tokens: {cells[1]}")


if __name__ == "__main__":
    main()

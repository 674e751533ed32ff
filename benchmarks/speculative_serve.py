"""Speculative decoding through the service: `xllm up` without and with `--speculative`, side by side.

    PYTHONPATH=. python benchmarks/speculative_serve.py [--speculative ngram] [--num-prompts 8]

Both systems run at once (default topology: a prefill and a decode worker each); the same code-edit
prompts (`xllm bench serve --workload code-edit`: a code block the answer repeats with one edit) go to
one then the other, one request at a time (concurrency 1), greedy, so drift on this machine hits both
alike. Prints output tok/s (tokens over the requests' end-to-end time) of each, and the ratio.
"""

import argparse
import asyncio
import random
import tempfile
from pathlib import Path

import aiohttp

from xllm.bench.client import Target, send
from xllm.bench.local_system import start_system, stop_system
from xllm.bench.workloads import BenchRequest, WorkloadSpec, generate


async def compare(urls: dict[str, str], requests: list[BenchRequest]) -> dict[str, dict]:
    totals = {name: {"tokens": 0, "seconds": 0.0} for name in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls.values():  # warm-up
            assert (await send(session, Target(url, "smollm2"), BenchRequest("hello", 4, 1))).ok
        for req in requests:
            for name, url in urls.items():
                result = await send(session, Target(url, "smollm2", temperature=0.0), req)
                assert result.ok, (result.error, result.detail)
                totals[name]["tokens"] += result.output_tokens
                totals[name]["seconds"] += result.e2e
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speculative", default="ngram")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=200)
    args = parser.parse_args()
    requests = generate(
        WorkloadSpec("code-edit", output_len=args.output_len), args.num_prompts, seed=0, salt_rng=random.Random(1)
    )
    flags = {"none": [], args.speculative: ["--speculative", args.speculative]}
    systems = {}
    try:
        for name, extra in flags.items():
            systems[name] = start_system(
                Path(tempfile.mkdtemp(prefix=f"xllm-spec-{name}-")), "--kv-cache-fraction", "0.05", *extra
            )
        totals = asyncio.run(compare({name: s.url for name, s in systems.items()}, requests))
    finally:
        for system in systems.values():
            stop_system(system.proc)
    rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    print(
        f"xllm up (prefill + decode), concurrency 1, {args.num_prompts} code-edit prompts, greedy, "
        f"max_tokens {args.output_len}"
    )
    for name, t in totals.items():
        print(f"{name:<8} {t['tokens']:>6} tokens  {rate[name]:>6.1f} tok/s  {rate[name] / rate['none']:.2f}x")


if __name__ == "__main__":
    main()

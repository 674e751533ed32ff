"""`xllm bench serve`: load-test any OpenAI-compatible server and report vLLM-style serving numbers.

    xllm bench serve --base-url http://127.0.0.1:8000 --input-len 128 --output-len 128 \\
        --max-concurrency 8 --num-prompts 64 --ignore-eos --goodput ttft:500 tpot:50
    python -m xllm.bench.serve ...   # the same, without the CLI

Each load point (one, or one per --sweep-rates / --sweep-concurrency value) gets the same seeded
workload with fresh salts, a warm-up that is not counted, a table on stdout, and at the end a JSON
file and PNG plots in --result-dir.
"""

import argparse
import asyncio
import json
import math
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xllm.bench.client import Target
from xllm.bench.metrics import parse_goodput, summarize
from xllm.bench.offline import OfflineError, run_offline
from xllm.bench.report import format_run, format_sweep, request_record, write_json
from xllm.bench.runner import LoadPoint, RunResult, first_model, run_load
from xllm.bench.workloads import WORKLOADS, WorkloadSpec, generate

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


class UsageError(ValueError):
    """Bad or inconsistent options."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("server")
    s.add_argument("--base-url", help=f"server root, e.g. {DEFAULT_BASE_URL} (default)")
    s.add_argument("--model", help="model name (default: the first one the server lists at /v1/models)")
    s.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    s.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    s.add_argument("--timeout", type=float, default=300.0, help="per-request time limit, s (default 300)")
    s.add_argument("--ignore-eos", action="store_true", help="send ignore_eos and min_tokens=max_tokens")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request")

    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    w.add_argument("--num-prompts", type=int, default=100, help="measured requests per load point")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens, approximate (1 word ~ 1)")
    w.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    w.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in L*(1 +- R)")
    w.add_argument("--prefix-groups", type=int, default=4, help="shared-prefix: groups G")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: shared prompt tokens")
    w.add_argument("--images-per-request", type=int, default=0, help="images in each request (chat endpoint)")
    w.add_argument("--image-repeat", type=float, default=0.0, help="share of images from a small repeating pool")
    w.add_argument("--image-size", type=int, default=336, help="image side, pixels")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--nats", help="offline workload: NATS URL of the xllm deployment")
    w.add_argument("--job-timeout", type=float, default=3600.0, help="offline: time limit for the job, s")

    a = parser.add_argument_group("arrivals")
    a.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson (default inf)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    a.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    a.add_argument("--sweep-rates", help="comma-separated request rates, one run each")
    a.add_argument("--sweep-concurrency", help="comma-separated max concurrencies, one run each")
    a.add_argument("--warmup", type=int, default=1, help="warm-up requests per load point, not counted")

    o = parser.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 (e2e too)")
    o.add_argument("--result-dir", default="bench-results")
    o.add_argument("--result-name", help="file name stem (default: time-workload-model)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when some requests succeeded, 1 when none did, 2 on bad options."""
    try:
        return asyncio.run(_run(args))
    except (UsageError, OfflineError) as e:
        print(f"xllm bench serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def load_points(args: argparse.Namespace) -> tuple[str | None, list[float], list[LoadPoint]]:
    """(x-axis name, x values, points): a sweep over rates or concurrencies, or a single point."""
    if args.sweep_rates and args.sweep_concurrency:
        raise UsageError("use --sweep-rates or --sweep-concurrency, not both")
    try:
        if args.sweep_rates:
            xs = [float(x) for x in args.sweep_rates.split(",")]
            pts = [LoadPoint(x, args.burstiness, args.max_concurrency) for x in xs]
            return "request rate (req/s)", xs, pts
        if args.sweep_concurrency:
            xs = [int(x) for x in args.sweep_concurrency.split(",")]
            pts = [LoadPoint(args.request_rate, args.burstiness, int(x)) for x in xs]
            return "max concurrency", xs, pts
    except ValueError as e:
        raise UsageError(f"bad sweep list: {e}") from None
    return None, [], [LoadPoint(args.request_rate, args.burstiness, args.max_concurrency)]


def check(args: argparse.Namespace, points: list[LoadPoint]) -> None:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or args.warmup < 0:
        raise UsageError("--num-prompts, --input-len and --output-len must be >= 1, --warmup >= 0")
    if not 0 <= args.range_ratio < 1:
        raise UsageError("--range-ratio must be in [0, 1)")
    for p in points:
        bad_conc = p.max_concurrency is not None and p.max_concurrency < 1
        if p.request_rate <= 0 or p.burstiness <= 0 or bad_conc:
            raise UsageError("request rates and burstiness must be > 0, concurrency >= 1")
    if args.images_per_request < 0 or not 0 <= args.image_repeat <= 1 or args.image_size < 1:
        raise UsageError("--images-per-request must be >= 0, --image-repeat in [0, 1], --image-size >= 1")
    if args.images_per_request and args.endpoint != "chat":
        raise UsageError("images need the chat endpoint")
    if args.workload == "offline" and not args.nats:
        raise UsageError("--workload offline needs --nats URL")


async def resolve_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.workload == "offline" and not args.base_url:
        raise UsageError("--workload offline needs --model (or --base-url to ask the server)")
    base = args.base_url or DEFAULT_BASE_URL
    try:
        return await first_model(base, args.api_key)
    except Exception as e:
        raise UsageError(f"cannot list models at {base}/v1/models ({e}); pass --model") from e


async def _run(args: argparse.Namespace) -> int:
    try:
        slo = parse_goodput(args.goodput)
    except ValueError as e:
        raise UsageError(str(e)) from None
    x_name, xs, points = load_points(args)
    check(args, points)
    if args.workload == "offline" and len(points) > 1:
        raise UsageError("the offline workload has no arrivals to sweep")
    spec = WorkloadSpec(
        args.workload,
        args.input_len,
        args.output_len,
        args.range_ratio,
        args.prefix_groups,
        args.prefix_len,
        images_per_request=args.images_per_request,
        image_repeat=args.image_repeat,
        image_size=args.image_size,
    )
    model = await resolve_model(args)
    target = Target(
        args.base_url or DEFAULT_BASE_URL,
        model,
        args.endpoint,
        args.api_key,
        args.timeout,
        args.ignore_eos,
        args.temperature,
        args.extra_body,
    )
    progress = not args.no_progress
    runs: list[tuple[RunResult, dict[str, Any]]] = []
    for point in points:
        requests = generate(spec, args.num_prompts, args.seed)
        if args.workload == "offline":
            run_, job = await run_offline(args.nats, target, requests, args.job_timeout, progress)
            summary = {**summarize(run_.results, run_.duration_s, slo), "job": job}
            title = f"offline job {job['job_id']}"
        else:
            warmup = generate(spec, args.warmup, args.seed + 1) if args.warmup else []
            run_ = await run_load(target, requests, point, args.seed, warmup, progress)
            summary = summarize(run_.results, run_.duration_s, slo)
            title = f"{args.workload} {point.label}"
        runs.append((run_, summary))
        print(format_run(title, summary), flush=True)
    if x_name:
        print("\n" + format_sweep(x_name.split(" (")[0], xs, [s for _, s in runs]))
    write_outputs(args, target, spec, runs, x_name, xs)
    return 0 if any(s["completed"] for _, s in runs) else 1


def write_outputs(
    args: argparse.Namespace,
    target: Target,
    spec: WorkloadSpec,
    runs: list[tuple[RunResult, dict[str, Any]]],
    x_name: str | None,
    xs: list[float],
) -> None:
    model_tag = re.sub(r"[^A-Za-z0-9._-]+", "_", target.model)[:40]
    stem = args.result_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{spec.kind}-{model_tag}"
    out = Path(args.result_dir)
    doc = {
        "tool": "xllm bench serve",
        "command": sys.argv,
        "target": {k: v for k, v in asdict(target).items() if k != "api_key"},
        "workload": asdict(spec),
        "num_prompts": args.num_prompts,
        "warmup": args.warmup,
        "seed": args.seed,
        "sweep": {"x": x_name, "values": xs} if x_name else None,
        "runs": [
            {
                "load": r.point.to_dict(),
                "started_at": r.started_at,
                "summary": s,
                "requests": [request_record(q) for q in r.results],
            }
            for r, s in runs
        ],
    }
    paths = [write_json(out / f"{stem}.json", doc)]
    if not args.no_plots:
        paths += _plots(spec, runs, x_name, xs, out, stem)
    print("wrote " + ", ".join(str(p) for p in paths))


def _plots(
    spec: WorkloadSpec,
    runs: list[tuple[RunResult, dict[str, Any]]],
    x_name: str | None,
    xs: list[float],
    out: Path,
    stem: str,
) -> list[Path]:
    try:
        from xllm.bench import plots
    except ImportError:
        print("matplotlib is missing (pip install 'xllm[bench]'): no plots", file=sys.stderr)
        return []
    labels = [r.point.label if len(runs) > 1 else spec.kind for r, _ in runs]
    cdfs = [(label, r.results) for label, (r, _) in zip(labels, runs)]
    paths = [plots.plot_latency_cdfs(cdfs, out / f"{stem}-latency-cdf.png")]
    if x_name:
        paths.append(plots.plot_sweep(x_name, xs, [s for _, s in runs], out / f"{stem}-sweep.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xllm bench serve", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

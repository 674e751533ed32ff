"""Workload-adaptive PD against the static modes, on one bursty workload, side by side in one run.

    PYTHONPATH=. python benchmarks/adaptive_pd.py [--num-prompts 60] [--rate 2] [--burstiness 0.25] \\
        [--slo-ttft-ms 2000] [--slo-tpot-ms 150] [--systems colocated,split,adaptive,adaptive+slo]

Each system is `xllm up` with the default model on this machine, two workers of two torch threads each,
started in turn (one at a time: they would share the two cores otherwise):
  colocated     two colocated workers; the router places whole requests (least loaded)
  split         one prefill + one decode worker; every request split (router --mode disaggregated)
  adaptive      the same two workers; the router chooses split or whole per request (auto)
  adaptive+slo  adaptive, with the SLO targets given to the router too: paths chosen to meet them, and
                online requests that cannot meet the TTFT target refused (429) instead of queued
With --cost-profile every worker starts from those measured step costs (`xllm profile`); without it they fit
from their own steps only, and predict nothing for their first 8.
The same seeded `xllm bench serve` workload (chat, lengths spread +-90 %, gamma-bursty arrivals, EOS
ignored) goes to each; each system first serves a short warm-up so that its workers have fitted their
step-cost models. Goodput is requests per second that met both targets; the ratio is against the best
static system (colocated or split) of this run.
"""

import argparse
import tempfile
from pathlib import Path

from xllm.bench.local_system import bench_serve, start_system, stop_system

SYSTEMS = {
    "colocated": ["--mode", "colocated", "--decode", "2"],
    "split": ["--mode", "disaggregated", "--router-mode", "disaggregated"],
    "adaptive": ["--mode", "disaggregated", "--router-mode", "auto"],
    "adaptive+slo": ["--mode", "disaggregated", "--router-mode", "auto"],
}
STATIC = ("colocated", "split")


def bench(url: str, args: argparse.Namespace, out: Path, name: str, num_prompts: int, seed: int) -> dict:
    """One `xllm bench serve` run of the workload; its summary."""
    return bench_serve(
        url,
        out,
        name,
        *("--input-len", str(args.input_len), "--output-len", str(args.output_len), "--range-ratio", "0.9"),
        *("--request-rate", str(args.rate), "--burstiness", str(args.burstiness), "--ignore-eos"),
        *("--num-prompts", str(num_prompts), "--seed", str(seed), "--warmup", "1"),
        *("--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}"),
    )


def paths(system) -> dict[str, int]:
    """Requests the router placed so far, by path (each placement logs its path)."""
    log = system.log("router")
    return {p: log.count(f'"path": "{p}"') for p in ("colocated", "disaggregated")}


def run_system(name: str, args: argparse.Namespace, root: Path) -> dict:
    state = root / name
    state.mkdir(exist_ok=True)
    extra = SYSTEMS[name] + ["--worker-threads", "2"]
    if args.cost_profile:
        extra += ["--cost-profile", args.cost_profile]
    if name == "adaptive+slo":
        extra += ["--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
    system = start_system(state, *extra)
    try:
        bench(system.url, args, root, f"{name}-warmup", 12, seed=99)
        before = paths(system)
        summary = bench(system.url, args, root, name, args.num_prompts, seed=args.seed)
        summary["paths"] = {p: n - before[p] for p, n in paths(system).items()}
        return summary
    finally:
        stop_system(system.proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--burstiness", type=float, default=0.25)
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--slo-tpot-ms", type=float, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost-profile", help="an `xllm profile` file for every worker (else they fit from scratch)")
    p.add_argument("--result-dir", help="keep the `xllm bench serve` JSON files here (for simulator_check.py)")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="adaptive-pd-") as tmp:
        root = Path(args.result_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for name in args.systems.split(","):
            results[name] = run_system(name, args, root)
            s = results[name]
            print(f"{name}: goodput {s['goodput']['request_goodput']:.3f} req/s", flush=True)
    best = max((results[n]["goodput"]["request_goodput"] for n in STATIC if n in results), default=0.0)
    print(
        f"\n{args.num_prompts} requests, {args.input_len}/{args.output_len} tokens +-90 %, rate {args.rate} req/s, "
        f"burstiness {args.burstiness}; SLO TTFT {args.slo_ttft_ms:.0f} ms, TPOT {args.slo_tpot_ms:.0f} ms\n"
    )
    print(
        "| system | goodput req/s | vs best static | attainment | failed | TTFT p50 / p90 ms | TPOT p50 / p90 ms "
        "| out tok/s | whole / split |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        g, ttft, tpot = s["goodput"], s["ttft_ms"], s["tpot_ms"]
        ratio = g["request_goodput"] / best if best else float("nan")
        print(
            f"| {name} | {g['request_goodput']:.3f} | {ratio:.2f}x | {g['attainment']:.0%} | {s['failed']} "
            f"| {ttft['p50']:.0f} / {ttft['p90']:.0f} | {tpot['p50']:.0f} / {tpot['p90']:.0f} "
            f"| {s['output_throughput']:.1f} | {s['paths']['colocated']} / {s['paths']['disaggregated']} |"
        )


if __name__ == "__main__":
    main()

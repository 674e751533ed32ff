"""`xllm simulate`: one simulated run, or goodput against the request rate per policy.

    xllm simulate --profile profile.json --instances 64 --policy split --prefill-share 0.25 --rate 8 \\
        --mix chat --slo-ttft-ms 2000 --slo-tpot-ms 150
    xllm simulate --profile profile.json --instances 8 --sweep-rates 1,2,4 \\
        --policies colocated,split:0.25,split:0.5,adaptive --slo-ttft-ms 2000 --slo-tpot-ms 150 --plot g.png

Every policy at a rate replays the same trace (same seed), so their differences are the policies'. The cost
model is the profile's fit (`xllm profile`); the scheduler limits default to the profile's too.
"""

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared.cost_model import CostModel, load_profile
from xllm.bench.metrics import latency_stats
from xllm.simulate.cluster import POLICIES, ClusterConfig, SimResult, simulate
from xllm.simulate.trace import MIXES, make_trace, parse_mix

REFUSALS = ("slo_unattainable", "overloaded")


def summarize(
    result: SimResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None, window_s: float | None = None
) -> dict[str, Any]:
    """The numbers `xllm bench serve` reports, from the simulated requests, plus the cluster's own. Goodput is
    per second of the arrival window (`window_s`; default the run's duration), so policies that replay the
    same trace compare by how many requests they served well, not by how long their tails drain."""
    recs = result.records
    ok = [r for r in recs if r.finish is not None]
    dur = max(result.duration_s, 1e-9)
    window = max(window_s or result.duration_s, 1e-9)

    def good(r: Any) -> bool:
        ttft_ok = slo_ttft_ms is None or r.ttft * 1000 <= slo_ttft_ms
        return ttft_ok and (slo_tpot_ms is None or r.tpot * 1000 <= slo_tpot_ms)

    n_good = sum(1 for r in ok if good(r))
    errors = Counter(r.error for r in recs if r.error)
    return {
        "num_requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "refused": sum(errors[e] for e in REFUSALS),
        "errors": dict(errors),
        "duration_s": result.duration_s,
        "request_throughput": len(ok) / dur,
        "output_throughput": sum(r.output_tokens for r in ok) / dur,
        "ttft_ms": latency_stats([r.ttft for r in ok]),
        "tpot_ms": latency_stats([r.tpot for r in ok if r.output_tokens > 1]),
        "goodput": {
            "slo_ms": {k: v for k, v in (("ttft", slo_ttft_ms), ("tpot", slo_tpot_ms)) if v is not None},
            "good_requests": n_good,
            "request_goodput": n_good / window,
            "window_s": window,
            "attainment": n_good / len(recs) if recs else 0.0,
        },
        "paths": dict(Counter(r.path for r in recs if r.path)),
        "role_switches": dict(result.switches),
        "preemptions": result.preemptions,
        "steps": result.steps,
        "events": result.events,
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_run(title: str, s: dict[str, Any]) -> str:
    """One run, laid out like `xllm bench serve`'s summary."""
    g = s["goodput"]
    slo = " ".join(f"{k}:{v:g}" for k, v in g["slo_ms"].items()) or "none"
    paths, errors, switches = s["paths"], s["errors"], s["role_switches"]
    rows = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("  refused (SLO / queues full)", f"{errors.get('slo_unattainable', 0)} / {errors.get('overloaded', 0)}"),
        ("Simulated duration (s)", f"{s['duration_s']:.2f}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        (f"Request goodput (req/s of arrivals) [{slo}]", f"{g['request_goodput']:.2f}"),
        ("SLO attainment (%)", f"{100 * g['attainment']:.1f}"),
        ("Whole / split requests", f"{paths.get('whole', 0)} / {paths.get('split', 0)}"),
        ("Role switches (to prefill / to decode)", f"{switches.get('prefill', 0)} / {switches.get('decode', 0)}"),
        ("Preemptions", s["preemptions"]),
        ("Errors", ", ".join(f"{k}={v}" for k, v in sorted(errors.items())) or "none"),
    ]
    width = 50
    lines = ["", f" {title} ".center(width + 20, "=")]
    lines += [f"{k + ':':<{width}}{v}" for k, v in rows]
    lines.append(f"{'latency (ms)':<14}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}")
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")):
        lines.append(f"{name:<14}" + "".join(f"{_ms(s[key][c]):>11}" for c in ("mean", "p50", "p90", "p99", "max")))
    lines.append("=" * (width + 20))
    return "\n".join(lines)


def format_sweep(policy: str, runs: list[dict[str, Any]]) -> str:
    """One line per rate for one policy."""
    head = (
        f"{policy:<14}{'rate':>6}{'reqs':>6}{'ok':>6}{'refused':>8}{'goodput':>9}{'SLO %':>7}{'TTFT p50':>10}"
        f"{'p90':>9}{'p99':>9}{'TPOT p50':>10}{'p90':>8}{'p99':>8}{'whole':>7}{'split':>7}{'switch':>7}{'cpu s':>7}"
    )
    lines = [head]
    for run in runs:
        s, t, p = run["summary"], run["summary"]["ttft_ms"], run["summary"]["tpot_ms"]
        lines.append(
            f"{'':<14}{run['rate']:>6g}{s['num_requests']:>6}{s['completed']:>6}{s['refused']:>8}"
            f"{s['goodput']['request_goodput']:>9.2f}{100 * s['goodput']['attainment']:>7.1f}"
            f"{_ms(t['p50']):>10}{_ms(t['p90']):>9}{_ms(t['p99']):>9}{_ms(p['p50']):>10}{_ms(p['p90']):>8}"
            f"{_ms(p['p99']):>8}{s['paths'].get('whole', 0):>7}{s['paths'].get('split', 0):>7}"
            f"{sum(s['role_switches'].values()):>7}{run['cpu_s']:>7.1f}"
        )
    return "\n".join(lines)


def parse_policy(spec: str, default_share: float) -> tuple[str, float]:
    """ "split:0.25" -> ("split", 0.25); "colocated" -> ("colocated", default_share)."""
    name, _, share = spec.strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)} (split and adaptive take :SHARE)")
    value = float(share) if share else default_share
    if not 0 < value < 1:
        raise ValueError(f"prefill share must be in (0, 1): {spec!r}")
    return name, value


def plot(path: Path, results: dict[str, list[dict[str, Any]]]) -> bool:
    """Goodput and SLO attainment against the rate, one line per policy; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in results.items():
        rates = [r["rate"] for r in runs]
        axes[0].plot(rates, [r["summary"]["goodput"]["request_goodput"] for r in runs], "o-", label=label)
        axes[1].plot(rates, [100 * r["summary"]["goodput"]["attainment"] for r in runs], "o-", label=label)
    for ax, name in zip(axes, ("goodput (req/s)", "SLO attainment (%)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xllm simulate", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--profile", required=True, help="a file `xllm profile` wrote: its fit prices every step")
    a("--instances", type=int, default=8)
    a("--policy", choices=POLICIES, default="colocated")
    a("--prefill-share", type=float, default=0.5, help="split: the prefill share of instances (adaptive: initial)")
    a("--policies", help="several, compared: e.g. colocated,split:0.25,split:0.5,adaptive")
    a("--mix", default="chat", help=f"lengths: {', '.join(MIXES)}, or weighted: chat:0.7,code:0.3")
    a("--rate", type=float, default=1.0, help="requests per second")
    a("--sweep-rates", help="several rates, comma-separated: a goodput-vs-rate table per policy")
    a("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, < 1 bursty")
    a("--diurnal-amplitude", type=float, default=0.0, help="rate x (1 + A sin(2 pi t / period)); 0: none")
    a("--diurnal-period-s", type=float, default=None, help="default: the duration")
    a("--duration", type=float, default=300.0, help="seconds of arrivals")
    a("--slo-ttft-ms", type=float, default=None)
    a("--slo-tpot-ms", type=float, default=None)
    a("--slo-reject-factor", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--max-batched-tokens", type=int, default=None, help="default: the profile's")
    a("--max-num-seqs", type=int, default=None, help="default: the profile's")
    a("--kv-tokens", type=int, default=131072, help="KV capacity per instance, in tokens")
    a("--kv-bytes-per-token", type=int, default=46080)
    a("--kv-bandwidth-gbps", type=float, default=4.5, help="KV hand-off, GB/s (default: shared-memory copy here)")
    a("--kv-latency-ms", type=float, default=4.0)
    a("--heartbeat-s", type=float, default=1.0)
    a("--plot", help="write a goodput-vs-rate PNG here (needs matplotlib)")
    a("--json", help="write every run's numbers here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _, meta = load_profile(args.profile)
        model = CostModel.from_dict(meta.get("fit") or {})
        if model is None:
            raise ValueError(f"{args.profile} has no fitted cost model")
        specs = [parse_policy(s, args.prefill_share) for s in (args.policies or args.policy).split(",")]
        rates = [float(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else [args.rate]
        parse_mix(args.mix)
    except (OSError, ValueError, KeyError) as e:
        print(f"xllm simulate: {e}", file=sys.stderr)
        return 2
    from shared.logging import configure_logging

    configure_logging("xllm-simulate", "error")  # the router's per-request lines
    results: dict[str, list[dict[str, Any]]] = {}
    for name, share in specs:
        label = name if name == "colocated" else f"{name}:{share:g}"
        config = ClusterConfig(
            policy=name,
            instances=args.instances,
            prefill_share=share,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            slo_reject_factor=args.slo_reject_factor,
            max_batched_tokens=args.max_batched_tokens or int(meta.get("max_num_batched_tokens", 2048)),
            max_num_seqs=args.max_num_seqs or int(meta.get("max_num_seqs", 64)),
            kv_tokens=args.kv_tokens,
            kv_bytes_per_token=args.kv_bytes_per_token,
            kv_bandwidth=args.kv_bandwidth_gbps * 1e9,
            kv_latency_s=args.kv_latency_ms / 1000,
            heartbeat_s=args.heartbeat_s,
            seed=args.seed,
        )
        for rate in rates:
            trace = make_trace(
                args.mix, rate, args.duration, args.seed, args.burstiness, args.diurnal_amplitude, args.diurnal_period_s
            )
            cpu = time.process_time()
            result = simulate(trace, model, config)
            summary = summarize(result, args.slo_ttft_ms, args.slo_tpot_ms, args.duration)
            run = {"rate": rate, "cpu_s": time.process_time() - cpu, "summary": summary}
            run["requests"] = [{**asdict(r), "ttft": r.ttft, "tpot": r.tpot} for r in result.records]
            results.setdefault(label, []).append(run)
            if len(specs) == 1 and len(rates) == 1:
                print(format_run(f"{label}, {args.instances} instances, {args.mix} at {rate:g} req/s", summary))
    if len(specs) > 1 or len(rates) > 1:
        print(
            f"{args.instances} instances, {args.mix}, {args.duration:g} s, burstiness {args.burstiness:g}, "
            f"SLO ttft {args.slo_ttft_ms} ms tpot {args.slo_tpot_ms} ms; goodput in req/s, latencies in ms"
        )
        for label, runs in results.items():
            print(format_sweep(label, runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "profile": meta, "runs": results}, indent=1))
    if args.plot and (len(rates) > 1 or len(specs) > 1):
        if plot(Path(args.plot), results):
            print(f"plot: {args.plot}")
        else:
            print("plot: matplotlib is not installed, none written", file=sys.stderr)
    return 0

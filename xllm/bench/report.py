"""The readable table printed at the end, and the JSON results file."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xllm.bench.client import RequestResult

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_run(title: str, s: dict[str, Any]) -> str:
    """One run: counts and throughput, then a latency table (ms) with mean / p50 / p90 / p99 / max."""
    rows = [
        ("Successful requests", f"{s['completed']}"),
        ("Failed requests", f"{s['failed']}"),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", f"{s['total_input_tokens']}"),
        ("Total output tokens", f"{s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    if g := s.get("goodput"):
        slo = " ".join(f"{k}:{v:g}" for k, v in g["slo_ms"].items())
        rows.append((f"Request goodput (req/s) [{slo}]", f"{g['request_goodput']:.2f}"))
        rows.append(("SLO attainment (%)", f"{100 * g['attainment']:.1f}"))
    if job := s.get("job"):
        t = job["completion_time_s"]
        rows.append(("Job completion time (s)", "no JobDone in time" if t is None else f"{t:.2f}"))
    errors = ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "none"
    rows.append(("Errors", errors))
    for kind, detail in sorted(s.get("error_examples", {}).items()):
        rows.append((f"  e.g. {kind}", detail[:100].replace("\n", " ")))
    rows.append(("Usage missing / != streamed chunks", f"{s['usage_missing']} / {s['usage_mismatch']}"))
    width = 50
    lines = ["", f" {title} ".center(width + 20, "=")]
    lines += [f"{k + ':':<{width}}{v}" for k, v in rows]
    lines.append(f"{'latency (ms)':<14}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}")
    for name, key in LATENCIES:
        st = s[key]
        vals = "".join(f"{_ms(st[c]):>11}" for c in ("mean", "p50", "p90", "p99", "max"))
        lines.append(f"{name:<14}{vals}")
    lines.append("=" * (width + 20))
    return "\n".join(lines)


def format_sweep(x_name: str, xs: list[Any], summaries: list[dict[str, Any]]) -> str:
    """One line per load point, to compare at a glance."""
    head = (
        f"{x_name:>12}{'ok':>6}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT p50':>10}{'TPOT p99':>10}{'E2E p50':>10}{'SLO %':>7}"
    )
    lines = [head]
    for x, s in zip(xs, summaries):
        g = s.get("goodput")
        slo = f"{100 * g['attainment']:.1f}" if g else "-"
        lines.append(
            f"{x!s:>12}{s['completed']:>6}{s['request_throughput']:>8.2f}{s['output_throughput']:>11.1f}"
            f"{_ms(s['ttft_ms']['p50']):>10}{_ms(s['ttft_ms']['p99']):>10}"
            f"{_ms(s['tpot_ms']['p50']):>10}{_ms(s['tpot_ms']['p99']):>10}"
            f"{_ms(s['e2e_ms']['p50']):>10}{slo:>7}"
        )
    return "\n".join(lines)


def request_record(r: RequestResult) -> dict[str, Any]:
    """Per-request line of the JSON file (ITL gaps summarized, not listed)."""
    d = asdict(r)
    d.pop("itl")
    d["tpot"] = r.tpot
    d["itl_count"] = len(r.itl)
    return d


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path

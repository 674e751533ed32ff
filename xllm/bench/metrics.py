"""The numbers of one run: throughput, latency statistics, goodput under SLOs, errors by kind.

Latencies are kept in seconds while measuring and reported in milliseconds. Percentiles interpolate
linearly between order statistics (numpy's default, as vLLM's benchmark does).
"""

from collections import Counter
from typing import Any

import numpy as np

from xllm.bench.client import RequestResult

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")


def latency_stats(values_s: list[float]) -> dict[str, float | None]:
    """mean / std / p50 / p90 / p99 / max in ms; all None for no values."""
    keys = ["mean", "std", *(f"p{p}" for p in PERCENTILES), "max"]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    pct = np.percentile(ms, PERCENTILES)
    vals = [ms.mean(), ms.std(), *pct, ms.max()]
    return {k: float(v) for k, v in zip(keys, vals)}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] (or "ttft:500,tpot:50") -> {"ttft": 500.0, "tpot": 50.0}, in ms."""
    slo: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            name = "e2e" if name == "e2el" else name
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"bad --goodput item {part!r}: use NAME:MS with NAME in {SLO_METRICS}")
            try:
                slo[name] = float(value)
            except ValueError:
                raise ValueError(f"bad --goodput value in {part!r}: not a number of ms") from None
            if slo[name] <= 0:
                raise ValueError(f"--goodput limit must be > 0 ms: {part!r}")
    return slo


def meets_slo(r: RequestResult, slo_ms: dict[str, float]) -> bool:
    """True when the request succeeded and meets every limit (TPOT of a 1-token answer counts as 0)."""
    if not r.ok:
        return False
    measured = {"ttft": r.ttft or 0.0, "tpot": r.tpot or 0.0, "e2e": r.e2e}
    return all(measured[k] * 1000.0 <= limit for k, limit in slo_ms.items())


def summarize(results: list[RequestResult], duration_s: float, slo_ms: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    dur = max(duration_s, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    s: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "error_examples": {r.error: r.detail for r in reversed(results) if not r.ok},  # first per kind
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "mean_input_tokens": total_in / len(ok) if ok else 0.0,
        "mean_output_tokens": total_out / len(ok) if ok else 0.0,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "ttft_ms": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": latency_stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": latency_stats([g for r in ok for g in r.itl]),
        "e2e_ms": latency_stats([r.e2e for r in ok]),
        "usage_missing": sum(1 for r in ok if not r.usage_reported),
        "usage_mismatch": sum(1 for r in ok if r.usage_mismatch),
    }
    if slo_ms:
        good = sum(1 for r in results if meets_slo(r, slo_ms))
        s["goodput"] = {
            "slo_ms": slo_ms,
            "good_requests": good,
            "request_goodput": good / dur,
            "attainment": good / len(results) if results else 0.0,
        }
    return s

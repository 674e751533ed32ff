"""PNG plots (matplotlib, Agg backend): latency CDFs per run; throughput and SLO attainment vs load."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from xllm.bench.client import RequestResult


def _cdf(ax: Any, values_ms: list[float], label: str) -> None:
    x = np.sort(np.asarray(values_ms))
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)


def plot_latency_cdfs(runs: list[tuple[str, list[RequestResult]]], path: Path) -> Path:
    """One panel each for TTFT, TPOT and E2E; one line per run (successful requests only)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    getters = {
        "TTFT": lambda r: r.ttft,
        "TPOT": lambda r: r.tpot,
        "E2E": lambda r: r.e2e,
    }
    for ax, (name, get) in zip(axes, getters.items()):
        for label, results in runs:
            vals = [v * 1000 for r in results if r.ok and (v := get(r)) is not None]
            if vals:
                _cdf(ax, vals, label)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep(x_name: str, xs: list[float], summaries: list[dict[str, Any]], path: Path) -> Path:
    """Output throughput, TTFT/TPOT p50 and p99, and (with --goodput) SLO attainment, against load."""
    with_slo = all("goodput" in s for s in summaries)
    fig, axes = plt.subplots(1, 3 if with_slo else 2, figsize=(15 if with_slo else 10, 4.2))
    axes[0].plot(xs, [s["output_throughput"] for s in summaries], "o-", label="output tok/s")
    axes[0].set_ylabel("output tokens/s")
    twin = axes[0].twinx()
    twin.plot(xs, [s["request_throughput"] for s in summaries], "s--", color="tab:orange", label="req/s")
    twin.set_ylabel("requests/s")
    lines = axes[0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes[0].legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    axes[0].set_title("throughput")
    for key, style in (("ttft_ms", "o-"), ("tpot_ms", "s-")):
        for p, alpha in (("p50", 1.0), ("p99", 0.5)):
            ys = [s[key][p] if s[key][p] is not None else np.nan for s in summaries]
            axes[1].plot(xs, ys, style, alpha=alpha, label=f"{key[:4].upper()} {p}")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms")
    axes[1].set_title("latency")
    axes[1].legend(fontsize=8)
    if with_slo:
        axes[2].plot(xs, [100 * s["goodput"]["attainment"] for s in summaries], "o-")
        axes[2].set_ylim(0, 102)
        axes[2].set_ylabel("requests meeting every SLO (%)")
        slo = " ".join(f"{k}:{v:g}ms" for k, v in summaries[0]["goodput"]["slo_ms"].items())
        axes[2].set_title(f"SLO attainment ({slo})")
    spread = min(xs) > 0 and max(xs) / min(xs) >= 8  # e.g. concurrency 1, 8, 32
    for ax in axes:
        if spread:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

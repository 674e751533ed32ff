"""Synthetic request traces: when requests arrive and how long their prompts and answers are.

Arrivals come from `xllm.bench.arrivals.arrival_times` (gamma gaps: burstiness 1 is Poisson, below 1 bursty),
so a simulated run and a `xllm bench serve` run at the same rate and burstiness see the same process. A
diurnal swing modulates the rate sinusoidally, rate x (1 + amplitude x sin(2 pi t / period)), by thinning
arrivals drawn at the peak rate. Lengths come from a named mix (or several, weighted): a mean prompt and
output length, each spread by a lognormal (sigma) or uniform (+- ratio) factor. Everything is drawn from
one seeded generator, so a trace is reproducible from its arguments.
"""

import math
from dataclasses import dataclass

import numpy as np

from xllm.bench.arrivals import arrival_times


@dataclass(frozen=True)
class Mix:
    """Mean prompt and output tokens, and how they spread: "lognormal" (spread = sigma of the log) or
    "uniform" (the mean x U(1 - spread, 1 + spread))."""

    prompt_mean: float
    output_mean: float
    spread: float = 0.5
    dist: str = "lognormal"


MIXES: dict[str, Mix] = {
    "chat": Mix(prompt_mean=512, output_mean=256),
    "code": Mix(prompt_mean=1536, output_mean=96),
    "long-document": Mix(prompt_mean=4096, output_mean=128, spread=0.4),
}


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the start
    prompt_tokens: int
    output_tokens: int
    mix: str = ""


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """ "chat" or "chat:0.7,code:0.3" -> [(name, weight)], weights normalized; ValueError for unknown names."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in MIXES:
            raise ValueError(f"unknown mix {name!r}: use one of {', '.join(MIXES)} (NAME or NAME:WEIGHT,...)")
        parts.append((name, float(weight) if weight else 1.0))
    total = sum(w for _, w in parts)
    if total <= 0:
        raise ValueError(f"mix weights must add up to > 0: {spec!r}")
    return [(name, w / total) for name, w in parts]


def _lengths(mix: Mix, mean: float, n: int, rng: np.random.Generator, low: int, high: int) -> np.ndarray:
    if mix.dist == "uniform":
        factor = rng.uniform(1 - mix.spread, 1 + mix.spread, size=n)
    else:  # lognormal, with the mean kept at `mean`
        factor = rng.lognormal(-(mix.spread**2) / 2, mix.spread, size=n)
    return np.clip(np.rint(mean * factor), low, high).astype(int)


def arrivals(
    rate: float,
    duration_s: float,
    rng: np.random.Generator,
    burstiness: float = 1.0,
    diurnal_amplitude: float = 0.0,
    diurnal_period_s: float | None = None,
) -> list[float]:
    """Arrival times in [0, duration_s): at `rate` per second on average, swung by the diurnal amplitude."""
    if rate <= 0 or duration_s <= 0:
        return []
    amp = min(max(diurnal_amplitude, 0.0), 1.0)
    period = diurnal_period_s or duration_s
    peak = rate * (1 + amp)
    times: list[float] = []
    start = 0.0
    while start < duration_s:  # in chunks until the window is covered
        n = max(16, math.ceil(peak * (duration_s - start) * 1.1) + 16)
        chunk = [start + t for t in arrival_times(n, peak, burstiness, rng)]
        if times:
            chunk = chunk[1:]  # its first is at `start`, the last time already drawn
        times += [t for t in chunk if t < duration_s]
        start = chunk[-1] if chunk else duration_s
    if amp > 0:
        keep = rng.random(len(times)) < np.array([1 + amp * math.sin(2 * math.pi * t / period) for t in times]) / (
            1 + amp
        )
        times = [t for t, k in zip(times, keep) if k]
    return times


def make_trace(
    mix: str,
    rate: float,
    duration_s: float,
    seed: int = 0,
    burstiness: float = 1.0,
    diurnal_amplitude: float = 0.0,
    diurnal_period_s: float | None = None,
    max_model_len: int = 8192,
) -> list[TraceRequest]:
    """The requests of a run, in arrival order; prompt + output always fits `max_model_len`."""
    rng = np.random.default_rng(seed)
    times = arrivals(rate, duration_s, rng, burstiness, diurnal_amplitude, diurnal_period_s)
    parts = parse_mix(mix)
    which = rng.choice(len(parts), size=len(times), p=[w for _, w in parts]) if times else np.array([], int)
    prompts, outputs = np.zeros(len(times), int), np.zeros(len(times), int)
    for k, (name, _) in enumerate(parts):
        idx = np.flatnonzero(which == k)
        m = MIXES[name]
        prompts[idx] = _lengths(m, m.prompt_mean, len(idx), rng, 8, max_model_len - 16)
        outputs[idx] = _lengths(m, m.output_mean, len(idx), rng, 1, max_model_len)
    outputs = np.minimum(outputs, max_model_len - prompts)
    return [
        TraceRequest(t, int(p), int(o), parts[int(k)][0])
        for t, p, o, k in zip(times, prompts.tolist(), outputs.tolist(), which.tolist())
    ]

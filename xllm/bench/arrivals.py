"""When to send: request arrival times for a Poisson process with a burstiness knob.

Gaps between arrivals are gamma-distributed with shape = burstiness and mean = 1/rate. Burstiness 1
is a Poisson process (exponential gaps); below 1 arrivals come in bursts, above 1 they are more even.
A rate of inf sends everything at once (then --max-concurrency alone shapes the load).
"""

import math

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Seconds from the start of the run at which each of n requests is sent; the first at 0."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]

"""Best-of-N wall time, for the micro-benchmarks in benchmarks/ (the minimum is robust to a noisy machine)."""

import time
from collections.abc import Callable


def best_ms(fn: Callable[[], object], repeats: int = 5, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000

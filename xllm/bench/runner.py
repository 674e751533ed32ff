"""One run at one load point: warm up, then send every request at its arrival time, and wait for all.

Arrivals follow arrivals.arrival_times (request rate + burstiness); --max-concurrency caps how many
are in flight (a request that arrives while the cap is reached waits its turn). The run's duration
is from the first measured send to the last measured completion; warm-up requests are not in it.
"""

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

from xllm.bench.arrivals import arrival_times
from xllm.bench.client import RequestResult, Target, api_root, send
from xllm.bench.progress import Progress
from xllm.bench.workloads import BenchRequest


@dataclass
class LoadPoint:
    request_rate: float = math.inf  # requests/s; inf = all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        conc = f" concurrency={self.max_concurrency}" if self.max_concurrency else ""
        return f"rate={rate}{conc}"

    def to_dict(self) -> dict:
        rate = None if math.isinf(self.request_rate) else self.request_rate
        return {"request_rate": rate, "burstiness": self.burstiness, "max_concurrency": self.max_concurrency}


@dataclass
class RunResult:
    point: LoadPoint
    results: list[RequestResult]
    duration_s: float
    started_at: float  # wall clock (time.time()) of the first measured send


async def run_load(
    target: Target,
    requests: list[BenchRequest],
    point: LoadPoint,
    seed: int,
    warmup: list[BenchRequest] | None = None,
    progress: bool = True,
) -> RunResult:
    sem = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None

    async def one(session: aiohttp.ClientSession, req: BenchRequest, bar: Progress) -> RequestResult:
        if sem is None:
            r = await send(session, target, req)
        else:
            async with sem:
                r = await send(session, target, req)
        bar.update(r.ok)
        return r

    # limit=0: no client-side connection cap; the request count and --max-concurrency bound the load.
    # force_close: a fresh connection per request; reused keep-alive connections that a server had
    # closed (llama-server does) failed as "Can not write request body" and counted as errors.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        if warmup:
            bar = Progress(len(warmup), "warmup", progress)
            await asyncio.gather(*(one(session, r, bar) for r in warmup))
            bar.close()

        times = arrival_times(len(requests), point.request_rate, point.burstiness, np.random.default_rng(seed))
        bar = Progress(len(requests), point.label, progress)
        started_at, t0 = time.time(), time.perf_counter()
        results = await _arrive(requests, times, t0, lambda req: one(session, req, bar))
        duration = time.perf_counter() - t0
        bar.close()
    return RunResult(point, results, duration, started_at)


async def _arrive(
    requests: list[BenchRequest],
    times: np.ndarray,
    t0: float,
    send_one: Callable[[BenchRequest], Awaitable[RequestResult]],
) -> list[RequestResult]:
    """Send each request at its arrival time (seconds after `t0`); their results, in order."""
    tasks = []
    for req, at in zip(requests, times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(req)))
    return list(await asyncio.gather(*tasks))


async def first_model(base_url: str, api_key: str | None, timeout_s: float = 10.0) -> str:
    """The first model id the server lists at /v1/models (what --model defaults to)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{api_root(base_url)}/models", headers=headers) as r,
    ):
        r.raise_for_status()
        data = (await r.json()).get("data") or []
    if not data:
        raise ValueError("the server lists no models")
    return str(data[0]["id"])

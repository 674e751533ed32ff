"""Retry with backoff, and run something periodically: written once, for every service."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.logging import get_logger

log = get_logger("xllm.retry")

T = TypeVar("T")


async def retry(
    op: Callable[[], Awaitable[T]],
    what: str,
    *,
    delay: float = 0.05,
    max_delay: float = 1.0,
    give_up_after: float | None = None,
    retry_if: Callable[[Exception], bool] = lambda e: True,
) -> T:
    """`await op()` until it returns, sleeping `delay` (doubling up to `max_delay`) after each failure for
    which `retry_if(error)` holds; other failures, and the last one after `give_up_after` seconds, are
    raised. A retried failure is logged as `<what>_failed`: the first at warning level, the rest at debug."""
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after is None else loop.time() + give_up_after
    for tries in itertools.count(1):
        try:
            return await op()
        except Exception as e:
            if not retry_if(e) or (deadline is not None and loop.time() + delay > deadline):
                raise
            (log.warning if tries == 1 else log.debug)(
                f"{what}_failed", error=f"{type(e).__name__}: {e}", tries=tries, retry_in_s=round(delay, 3)
            )
        _raise_if_cancelled()
        await asyncio.sleep(delay)
        delay = min(max_delay, 2 * delay)


async def every(interval: float, op: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `op` every `interval` seconds, forever (cancel the task to stop); a failure is logged as
    `<what>_failed` and the next run comes on time."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await op()
        except Exception as e:
            log.warning(f"{what}_failed", error=f"{type(e).__name__}: {e}")
        _raise_if_cancelled()
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))


def _raise_if_cancelled() -> None:
    """A cancel that `op` swallowed still stops the loop: on Python 3.11, asyncio.wait_for (which nats-py
    uses for every request) returns normally when its future completes just as the task is cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError

"""shared/retry.py: retry with backoff until success, a deadline or a non-retriable error; every() runs on
time, survives failures, and stops when cancelled even if its operation swallowed the cancel."""

import asyncio
import contextlib

import pytest

from shared.retry import every, retry


async def test_retry_until_it_works() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "done"

    assert await retry(flaky, "flaky", delay=0.001) == "done" and len(calls) == 3


async def test_retry_gives_up_after_its_deadline_and_on_errors_it_should_not_retry() -> None:
    async def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await retry(down, "down", delay=0.01, give_up_after=0.05)

    async def bad() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        await retry(bad, "bad", retry_if=lambda e: isinstance(e, ConnectionError))


async def test_every_survives_failures_and_a_swallowed_cancel_still_stops_it() -> None:
    runs, release = [], asyncio.Event()

    async def op() -> None:
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("one bad run")
        if len(runs) == 4:
            # Swallow the cancel, as asyncio.wait_for does on Python 3.11 when its future completes just then.
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(every(0.001, op, "op"))
    while len(runs) < 4:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert len(runs) == 4

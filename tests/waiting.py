"""Waiting for a condition in a test: bounded by a generous deadline, never by how fast this machine is."""

import asyncio
import time


async def until(check, within: float, what: str) -> float:
    """Seconds until `check()` (sync or async) holds, asking every 0.05 s; fails after `within` seconds."""
    start = time.monotonic()
    while True:
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return time.monotonic() - start
        assert time.monotonic() - start < within, what
        await asyncio.sleep(0.05)

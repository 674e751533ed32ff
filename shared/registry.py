"""Instance registry: one key per live instance in a NATS KV bucket whose TTL is the liveness timeout.

Workers put their InstanceInfo every ~1 s (a `Heartbeater` does it); the bucket's max age drops a key
that has not been refreshed for `ttl` seconds. A worker that stops cleanly calls `remove()`. Readers
(router, gateway, kvcache) keep one live `InstanceView` per process (shared/instance_view.py).

    registry = await InstanceRegistry.open(js)
    async with Heartbeater(registry, lambda: engine_info(), interval=1.0):
        ...serve...
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from shared.logging import get_logger
from shared.messages import InstanceInfo, SchemaError
from shared.retry import every
from shared.subjects import INSTANCES_BUCKET

log = get_logger("xllm.registry")

# A worker busy in a long engine step may miss a beat or two; 5 s tolerates that and still drops a
# dead worker well before a client notices.
DEFAULT_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0

_VALID_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")

InfoSupplier = Callable[[], InstanceInfo | Awaitable[InstanceInfo]]


class InstanceRegistry:
    def __init__(self, kv: KeyValue, bucket: str, ttl: float):
        self.kv = kv
        self.bucket = bucket
        self.ttl = ttl

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, bucket: str = INSTANCES_BUCKET, ttl: float = DEFAULT_TTL_S
    ) -> InstanceRegistry:
        """Open the bucket, creating it if needed. An existing bucket keeps its own TTL."""
        try:
            kv = await js.create_key_value(bucket=bucket, ttl=ttl, history=1)
        except nats.js.errors.BadRequestError:
            # Created earlier with other settings: use it as it is rather than fight over it.
            kv = await js.key_value(bucket)
            info = await js.stream_info(f"KV_{bucket}")
            if info.config.max_age and abs(info.config.max_age - ttl) > 1e-3:
                log.warning("registry_ttl_differs", bucket=bucket, wanted=ttl, actual=info.config.max_age)
            ttl = info.config.max_age or ttl
        return cls(kv, bucket, ttl)

    async def heartbeat(self, info: InstanceInfo) -> None:
        """Put (refresh) the instance's entry; its TTL restarts now."""
        await self.kv.put(key(info.instance_id), info.encode())

    async def remove(self, instance_id: str) -> None:
        await self.kv.purge(key(instance_id))

    async def get(self, instance_id: str) -> InstanceInfo | None:
        try:
            entry = await self.kv.get(key(instance_id))
        except nats.js.errors.KeyNotFoundError:  # also raised for deleted/purged keys
            return None
        return decode(entry.value)


class Heartbeater:
    """Background task: every `interval` seconds, put `supplier()` into the registry.

    `supplier` may be sync or async; a failing beat is logged and retried at the next interval (a
    NATS reconnect must not kill the worker). `stop(remove=True)` removes the entry, so a clean
    shutdown does not wait for the TTL.
    """

    def __init__(self, registry: InstanceRegistry, supplier: InfoSupplier, interval: float = HEARTBEAT_INTERVAL_S):
        if interval >= registry.ttl:
            raise ValueError(f"heartbeat interval {interval}s must be shorter than the TTL {registry.ttl}s")
        self.registry = registry
        self.supplier = supplier
        self.interval = interval
        self.beats = 0
        self.last_instance_id: str | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="heartbeater")

    async def beat(self) -> None:
        """One heartbeat now (the loop calls it; a worker may call it to publish a state change)."""
        info = self.supplier()
        if inspect.isawaitable(info):
            info = await info
        await self.registry.heartbeat(info)
        self.last_instance_id = info.instance_id
        self.beats += 1

    async def stop(self, remove: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # our own cancel is no error
            self._task = None
        if remove and self.last_instance_id is not None:
            try:
                await self.registry.remove(self.last_instance_id)
            except Exception as e:  # shutting down: the TTL removes it anyway
                log.warning("registry_remove_failed", instance=self.last_instance_id, error=str(e))

    async def __aenter__(self) -> Heartbeater:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _run(self) -> None:
        await every(self.interval, self._beat_in_time, "heartbeat")

    async def _beat_in_time(self) -> None:
        # A slow beat (a busy bus or host) still counts if it lands before the entry expires; bounding
        # it by the interval instead made every beat fail whenever puts got slow. (asyncio.timeout, not
        # wait_for: on Python 3.11 wait_for can swallow the cancel that stops the heartbeats.)
        async with asyncio.timeout(self.registry.ttl):
            await self.beat()


def key(instance_id: str) -> str:
    if not _VALID_KEY.match(instance_id) or instance_id.startswith(".") or instance_id.endswith("."):
        raise ValueError(
            f"instance id {instance_id!r} is not a valid registry key (letters, digits, and - / _ = . only)"
        )
    return instance_id


def decode(data: bytes | None) -> InstanceInfo | None:
    if not data:
        return None
    try:
        return InstanceInfo.decode(data)
    except SchemaError as e:
        log.warning("registry_bad_entry", error=str(e))
        return None

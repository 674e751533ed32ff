"""One process's live view of the instance registry: a long-lived watch applies puts and deletes to a map.

    view = await InstanceView.open(nc)       # waits for the registry's current entries
    view.instances()                          # the live instances, sorted by id
    view.on_gone.append(callback)             # callback(instance_id) when one leaves

An instance is gone when its entry is deleted (a worker that stops cleanly removes itself) or when no
heartbeat of it has reached this process for the registry's TTL while this process was connected to
NATS. Nothing is removed for being absent from a read: a watch's first delivery may come back short
(a fresh watcher per read once made every instance look dead under load). While NATS is unreachable
nothing expires; once the connection is back the watch is made again (a restarted server forgot its
consumers) and every instance's clock restarts, so an outage is never taken for deaths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from shared import bus
from shared.logging import get_logger
from shared.messages import InstanceInfo
from shared.registry import DEFAULT_TTL_S, InstanceRegistry, decode
from shared.retry import retry
from shared.subjects import INSTANCES_BUCKET

log = get_logger("xllm.registry")

SYNC_TIMEOUT_S = 5.0  # how long open() waits for the registry's current entries
_REMOVED = ("DEL", "PURGE")  # KV-Operation of a delete / purge marker


class InstanceView:
    def __init__(self, nc: Client, registry: InstanceRegistry):
        self.nc = nc
        self.registry = registry
        self.ttl = registry.ttl
        self.on_gone: list[Callable[[str], None]] = []
        self._live: dict[str, InstanceInfo] = {}
        self._clocks: dict[str, asyncio.TimerHandle] = {}  # live or expected instance -> its expiry
        self._sub = None
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()  # set, and replaced, at every change
        self._rewatch: asyncio.Task | None = None
        self._prefix = f"$KV.{registry.bucket}."

    @classmethod
    async def open(
        cls,
        nc: Client,
        *,
        bucket: str = INSTANCES_BUCKET,
        ttl: float = DEFAULT_TTL_S,
        sync_timeout: float = SYNC_TIMEOUT_S,
    ) -> InstanceView:
        view = cls(nc, await InstanceRegistry.open(nc.jetstream(), bucket=bucket, ttl=ttl))
        await view.start(sync_timeout)
        return view

    async def start(self, sync_timeout: float = SYNC_TIMEOUT_S) -> None:
        bus.on_connection(self.nc, lost=self._pause, restored=self._restart)
        await self._watch()
        try:
            await asyncio.wait_for(self._synced.wait(), sync_timeout)
        except TimeoutError:
            log.warning("registry_sync_slow", timeout_s=sync_timeout, instances=len(self._live))

    async def close(self) -> None:
        if self._rewatch is not None:
            self._rewatch.cancel()
        self._pause()
        await self._unwatch()

    # -- reading ------------------------------------------------------------------------------------

    def instances(self) -> list[InstanceInfo]:
        return [self._live[i] for i in sorted(self._live)]

    def get(self, instance_id: str) -> InstanceInfo | None:
        return self._live.get(instance_id)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `predicate()` holds, checked at every change of the view (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def expect(self, instance_id: str) -> None:
        """Someone says `instance_id` exists (the router chose it, it published KV events) before this
        view has seen it: it is gone unless a heartbeat of it arrives within the TTL."""
        if instance_id not in self._clocks:
            self._start_clock(instance_id)

    # -- the watch ----------------------------------------------------------------------------------

    async def _watch(self) -> None:
        self._synced.clear()
        self._sub = await self.nc.jetstream().subscribe(
            f"{self._prefix}>",
            stream=f"KV_{self.registry.bucket}",
            cb=self._on_entry,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
        # The server's own count, not what has reached this client: nothing delivered and nothing
        # pending means the bucket is empty; otherwise the last entry delivered says so itself.
        info = await self._sub.consumer_info()
        if info.num_pending == 0 and info.delivered.consumer_seq == 0:
            self._synced.set()

    async def _unwatch(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as e:  # the connection is closing, or the consumer died with the server
                log.debug("registry_unwatch_failed", error=repr(e))

    async def _on_entry(self, msg: Msg) -> None:
        instance_id = msg.subject[len(self._prefix) :]
        operation = (msg.headers or {}).get("KV-Operation")
        if operation in _REMOVED:
            self._drop(instance_id, "removed")
        elif operation is None and not (msg.headers or {}).get("Nats-Marker-Reason"):
            info = decode(msg.data)  # an expiry marker (server-side TTL) says nothing: our clock decides
            if info is not None:
                self._live[instance_id] = info
                self._start_clock(instance_id)
                self._notify()
        if msg.metadata.num_pending == 0:
            self._synced.set()

    # -- expiry -------------------------------------------------------------------------------------

    def _start_clock(self, instance_id: str) -> None:
        if (old := self._clocks.get(instance_id)) is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._clocks[instance_id] = loop.call_later(self.ttl, self._drop, instance_id, "expired")

    def _drop(self, instance_id: str, why: str) -> None:
        if (clock := self._clocks.pop(instance_id, None)) is not None:
            clock.cancel()
        if self._live.pop(instance_id, None) is None and clock is None:
            return  # not known here: nothing to tell
        log.info("instance_gone", instance=instance_id, reason=why)
        for callback in list(self.on_gone):
            callback(instance_id)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _pause(self) -> None:
        """NATS is unreachable: silence says nothing now, so no clock runs."""
        for clock in self._clocks.values():
            clock.cancel()

    def _restart(self) -> None:
        if self._rewatch is None or self._rewatch.done():
            self._rewatch = asyncio.create_task(self._watch_again(), name="registry-rewatch")

    async def _watch_again(self) -> None:
        """Back on NATS: watch afresh (retrying while JetStream recovers), then restart every clock."""
        await self._unwatch()
        await retry(self._watch, "registry_rewatch")
        for instance_id in list(self._clocks):
            self._start_clock(instance_id)
        log.info("registry_rewatched", instances=len(self._live))

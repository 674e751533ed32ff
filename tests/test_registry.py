"""shared.registry + shared.instance_view: heartbeats keep an instance in every process's live view;
silence (while connected) or remove() takes it out; a NATS outage or a short read never does."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from shared import bus
from shared.bus import connect
from shared.instance_view import InstanceView
from shared.messages import InstanceInfo
from shared.registry import Heartbeater, InstanceRegistry
from xllm.natsd import NatsServer

pytestmark = pytest.mark.integration

TTL = 1.5


def _info(iid: str, **kw) -> InstanceInfo:
    return InstanceInfo(instance_id=iid, role="decode", model="m", pid=1, host="h", **kw)


@pytest.fixture
async def view(nc) -> InstanceView:
    # A bucket of its own per test: no interference, and a short TTL.
    view = await InstanceView.open(nc, bucket=f"reg_{uuid.uuid4().hex[:10]}", ttl=TTL)
    yield view
    await view.close()


def _ids(view: InstanceView) -> list[str]:
    return [i.instance_id for i in view.instances()]


async def test_heartbeat_lists_latest_info(view) -> None:
    registry = view.registry
    assert view.instances() == []
    await registry.heartbeat(_info("w-b", running=1))
    await registry.heartbeat(_info("w-a"))
    await registry.heartbeat(_info("w-b", running=3, free_blocks=7))
    await view.wait(lambda: _ids(view) == ["w-a", "w-b"] and view.get("w-b").running == 3)
    assert view.get("w-b").free_blocks == 7 and view.get("nope") is None
    assert (await registry.get("w-b")).running == 3 and await registry.get("nope") is None


async def test_a_new_view_starts_with_every_current_entry(nc, view) -> None:
    for i in range(20):
        await view.registry.heartbeat(_info(f"w-{i:02d}"))
    again = await InstanceView.open(nc, bucket=view.registry.bucket)  # open() waits for the current entries
    try:
        assert _ids(again) == [f"w-{i:02d}" for i in range(20)]
    finally:
        await again.close()


async def test_silent_instance_leaves_within_the_ttl_and_only_then(view) -> None:
    gone: list[tuple[str, float]] = []
    view.on_gone.append(lambda iid: gone.append((iid, time.monotonic())))
    dead = Heartbeater(view.registry, lambda: _info("w-dead"), interval=0.3)
    async with Heartbeater(view.registry, lambda: _info("w-alive"), interval=0.3):
        await dead.beat()
        dead.start()
        await view.wait(lambda: _ids(view) == ["w-alive", "w-dead"])
        while dead.beats < 8:  # well past the TTL: the beats keep both listed
            await view.wait(lambda n=dead.beats: dead.beats > n, timeout=TTL)
        assert gone == []
        await dead.stop(remove=False)  # as if the worker hung or was SIGKILLed
        stopped = time.monotonic()
        await view.wait(lambda: _ids(view) == ["w-alive"], timeout=TTL + 2.5)
        assert gone[0][0] == "w-dead" and gone[0][1] - stopped > TTL - 0.5  # not dropped early either
        assert len(gone) == 1  # the beating one stays


async def test_remove_and_clean_stop_are_immediate(view) -> None:
    registry = view.registry
    await registry.heartbeat(_info("w-1"))
    await view.wait(lambda: _ids(view) == ["w-1"])
    await registry.remove("w-1")
    await view.wait(lambda: _ids(view) == [], timeout=TTL / 2)  # well before its TTL
    async with Heartbeater(registry, lambda: _info("w-2"), interval=0.3):
        await view.wait(lambda: _ids(view) == ["w-2"])
    await view.wait(lambda: _ids(view) == [], timeout=TTL / 2)  # __aexit__ removed it, no TTL wait
    await registry.heartbeat(_info("w-1"))  # a removed id can come back
    await view.wait(lambda: _ids(view) == ["w-1"])


async def test_an_expected_instance_that_never_heartbeats_is_gone_after_the_ttl(view) -> None:
    gone: list[str] = []
    view.on_gone.append(gone.append)
    view.expect("w-ghost")
    view.expect("w-real")
    async with Heartbeater(view.registry, lambda: _info("w-real"), interval=0.3):
        await view.wait(lambda: "w-ghost" in gone, timeout=TTL + 2)
        assert gone == ["w-ghost"] and _ids(view) == ["w-real"]


async def test_heartbeater_async_supplier_and_failures(view) -> None:
    calls = 0

    async def supplier() -> InstanceInfo:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("engine busy")  # one bad beat must not end the heartbeats
        return _info("w-x", running=calls)

    async with Heartbeater(view.registry, supplier, interval=0.1):
        await view.wait(lambda: view.get("w-x") is not None and view.get("w-x").running >= 4)
    assert calls >= 4


async def test_reopen_existing_bucket_keeps_its_ttl(nc, view) -> None:
    again = await InstanceRegistry.open(nc.jetstream(), bucket=view.registry.bucket, ttl=9.0)
    assert again.ttl == pytest.approx(TTL)


async def test_validation(view) -> None:
    with pytest.raises(ValueError, match="not a valid registry key"):
        await view.registry.heartbeat(_info("bad id*"))
    with pytest.raises(ValueError, match="shorter than the TTL"):
        Heartbeater(view.registry, lambda: _info("w"), interval=TTL)


async def test_a_nats_outage_is_no_death_and_a_real_death_after_it_is_seen(tmp_path) -> None:
    """SIGKILL the server for longer than the TTL, start it again on the same port and store: the
    instance that heartbeats again stays in the view throughout; the one that does not is gone a TTL
    after the view is back on NATS."""
    server = NatsServer(tmp_path)
    server.start()
    watcher, worker = await connect(server.url, "view"), await connect(server.url, "worker")
    view = await InstanceView.open(watcher, bucket="outage", ttl=TTL)
    gone: list[tuple[str, float]] = []
    view.on_gone.append(lambda iid: gone.append((iid, time.monotonic())))
    restored = asyncio.Event()
    bus.on_connection(watcher, restored=restored.set)
    registry = await InstanceRegistry.open(worker.jetstream(), bucket="outage", ttl=TTL)
    alive = Heartbeater(registry, lambda: _info("w-alive"), interval=0.3)
    try:
        await registry.heartbeat(_info("w-dies"))
        await alive.beat()
        alive.start()
        await view.wait(lambda: _ids(view) == ["w-alive", "w-dies"])
        server.kill()
        await asyncio.sleep(TTL * 2)  # the outage itself: longer than the TTL
        assert _ids(view) == ["w-alive", "w-dies"] and gone == []
        server.restart()
        await asyncio.wait_for(restored.wait(), 10)
        back = time.monotonic()
        await view.wait(lambda: _ids(view) == ["w-alive"], timeout=TTL + 3)
        assert [iid for iid, _ in gone] == ["w-dies"] and gone[0][1] - back > TTL - 0.5
    finally:
        await alive.stop(remove=False)
        await view.close()
        await watcher.close()
        await worker.close()
        server.stop()

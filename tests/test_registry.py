"""shared.registry: heartbeats keep an instance listed; silence or remove() takes it out."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from shared.messages import InstanceInfo
from shared.registry import Heartbeater, InstanceRegistry

pytestmark = pytest.mark.integration

TTL = 1.5


def _info(iid: str, **kw) -> InstanceInfo:
    return InstanceInfo(instance_id=iid, role="decode", model="m", pid=1, host="h", **kw)


@pytest.fixture
async def registry(nc) -> InstanceRegistry:
    # A bucket of its own per test: no interference, and a short TTL.
    return await InstanceRegistry.open(nc.jetstream(), bucket=f"reg_{uuid.uuid4().hex[:10]}", ttl=TTL)


async def _ids(registry: InstanceRegistry) -> list[str]:
    return [i.instance_id for i in await registry.list_instances()]


async def test_heartbeat_lists_latest_info(registry) -> None:
    assert await registry.list_instances() == []
    await registry.heartbeat(_info("w-b", running=1))
    await registry.heartbeat(_info("w-a"))
    await registry.heartbeat(_info("w-b", running=3, free_blocks=7))
    infos = await registry.list_instances()
    assert [i.instance_id for i in infos] == ["w-a", "w-b"]
    assert (infos[1].running, infos[1].free_blocks) == (3, 7)
    assert (await registry.get("w-b")).running == 3
    assert await registry.get("nope") is None


async def test_silent_instance_vanishes_within_the_ttl(registry) -> None:
    beater = Heartbeater(registry, lambda: _info("w-dead"), interval=0.3)
    await registry.heartbeat(_info("w-alive"))
    async with Heartbeater(registry, lambda: _info("w-alive"), interval=0.3):
        beater.start()
        await asyncio.sleep(TTL + 0.5)  # longer than the TTL: the beats keep both listed
        assert await _ids(registry) == ["w-alive", "w-dead"]
        assert beater.beats >= 4
        await beater.stop(remove=False)  # as if the worker hung or was SIGKILLed
        stopped = time.monotonic()
        while "w-dead" in await _ids(registry):
            assert time.monotonic() - stopped < TTL + 2.5, "silent instance still listed"
            await asyncio.sleep(0.1)
        assert time.monotonic() - stopped > TTL - 0.5  # it was not dropped early either
        assert await _ids(registry) == ["w-alive"]  # the beating one stays


async def test_remove_and_clean_stop_are_immediate(registry) -> None:
    await registry.heartbeat(_info("w-1"))
    await registry.remove("w-1")
    assert await _ids(registry) == []
    async with Heartbeater(registry, lambda: _info("w-2"), interval=0.3) as hb:
        await asyncio.sleep(0.05)
        assert hb.beats == 1 and await _ids(registry) == ["w-2"]
    assert await _ids(registry) == []  # __aexit__ removed it, no TTL wait
    await registry.heartbeat(_info("w-1"))  # a removed id can come back
    assert await _ids(registry) == ["w-1"]


async def test_heartbeater_async_supplier_and_failures(registry) -> None:
    calls = 0

    async def supplier() -> InstanceInfo:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("engine busy")  # one bad beat must not end the heartbeats
        return _info("w-x", running=calls)

    async with asyncio.timeout(10), Heartbeater(registry, supplier, interval=0.1) as hb:  # fail, never hang
        while hb.beats < 3:
            await asyncio.sleep(0.05)
    assert calls >= 4


async def test_reopen_existing_bucket_keeps_its_ttl(nc, registry) -> None:
    again = await InstanceRegistry.open(nc.jetstream(), bucket=registry.kv._name, ttl=9.0)
    assert again.ttl == pytest.approx(TTL)
    await registry.heartbeat(_info("w-1"))
    assert await _ids(again) == ["w-1"]


async def test_validation(registry) -> None:
    with pytest.raises(ValueError, match="not a valid registry key"):
        await registry.heartbeat(_info("bad id*"))
    with pytest.raises(ValueError, match="shorter than the TTL"):
        Heartbeater(registry, lambda: _info("w"), interval=TTL)

"""kvcache: the pure index (events, prefixes, gaps) and the NATS service (query, replay, pruning)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.kvcache.config import KvCacheConfig
from services.kvcache.index import KvIndex
from services.kvcache.service import KvCacheService
from shared import bus, subjects
from shared.block_hash import block_hashes
from shared.config import load_config
from shared.instance_view import InstanceView
from shared.messages import InstanceInfo, KvEvent, KvQuery, KvQueryReply
from shared.registry import Heartbeater
from tests.waiting import until
from xllm.natsd import free_port

BS = 4
PROMPT = list(range(100, 124))  # 6 full blocks of 4
H = block_hashes(PROMPT, BS)


def ev(
    iid: str,
    seq: int,
    event: str = "stored",
    hashes: list[int] | None = None,
    parent: int | None = None,
    tier: str = "device",
) -> KvEvent:
    return KvEvent(
        instance_id=iid, seq=seq, event=event, block_hashes=list(hashes or []), parent_hash=parent, tier=tier
    )


# -- the pure index ---------------------------------------------------------------------------------


def test_stored_gives_longest_prefix_per_instance() -> None:
    idx = KvIndex()
    idx.apply(ev("a", 1, hashes=H[:4]))
    idx.apply(ev("b", 1, hashes=H[:2]))
    idx.apply(ev("b", 2, hashes=H[2:3], parent=H[1]))  # continues its chain
    idx.apply(ev("c", 1, hashes=block_hashes([7] * 8, BS)))  # another prompt entirely
    assert idx.matches(H) == {"a": 4, "b": 3}
    assert idx.matches(H[:1]) == {"a": 1, "b": 1}
    assert idx.matches(block_hashes([1, 2, 3, 4], BS)) == {}
    assert idx.matches([]) == {}
    assert idx.events_applied == 4 and idx.size == 6


def test_prefix_stops_at_first_missing_block() -> None:
    idx = KvIndex()
    idx.apply(ev("a", 1, hashes=H))
    idx.apply(ev("a", 2, "removed", hashes=[H[2]]))  # evicted mid-chain
    assert idx.matches(H) == {"a": 2}  # blocks 3.. are held but unreachable
    idx.apply(ev("b", 1, hashes=H[3:], parent=H[2]))  # orphan chain: its parent was never stored
    assert idx.matches(H) == {"a": 2}
    idx.apply(ev("b", 2, hashes=H[:3]))  # now the parent chain exists
    assert idx.matches(H) == {"a": 2, "b": 6}


def test_removed_and_cleared_leave_nothing_behind() -> None:
    idx = KvIndex()
    idx.apply(ev("a", 1, hashes=H))
    idx.apply(ev("b", 1, hashes=H[:2]))
    idx.apply(ev("a", 2, "removed", hashes=H[3:]))
    assert idx.matches(H) == {"a": 3, "b": 2}
    idx.apply(ev("a", 3, "cleared"))
    assert idx.matches(H) == {"b": 2}
    idx.apply(ev("b", 2, "removed", hashes=H[:2]))
    idx.apply(ev("b", 3, "removed", hashes=H[:2]))  # removing what is gone: harmless
    assert idx.matches(H) == {} and idx.size == 0 and idx.entries == 0 and idx.blocks == {}


def test_tiers_are_tracked_per_block() -> None:
    idx = KvIndex()
    idx.apply(ev("a", 1, hashes=H[:3]))
    idx.apply(ev("a", 2, hashes=H[1:3], tier="host"))  # copied to host, still on device
    idx.apply(ev("a", 3, "removed", hashes=H[2:3], tier="device"))  # block 2 now only on host
    assert idx.longest_prefix(H) == {"a": ["device", "device", "host"]}
    idx.apply(ev("a", 4, "removed", hashes=H[1:3], tier="host"))
    assert idx.longest_prefix(H) == {"a": ["device", "device"]}


def test_gap_drops_the_instances_entries_then_goes_on() -> None:
    idx = KvIndex()
    idx.apply(ev("a", 1, hashes=H[:4]))
    idx.apply(ev("b", 1, hashes=H[:4]))
    r = idx.apply(ev("a", 3, hashes=H[4:5], parent=H[3]))  # seq 2 was lost: maybe a "removed"
    assert r.gap and r.expected_seq == 2 and idx.gaps_detected == 1
    assert idx.matches(H) == {"b": 4}  # a's entries are not trusted any more; b is untouched
    idx.apply(ev("a", 4, hashes=H[:4]))  # in sequence again: indexed from here on
    assert idx.matches(H) == {"a": 5, "b": 4}
    assert idx.gaps_detected == 1


def test_duplicates_first_seq_and_cleared() -> None:
    idx = KvIndex()
    assert not idx.apply(ev("a", 1, hashes=H[:1])).gap
    assert not idx.apply(ev("a", 1, hashes=H[:1])).applied  # redelivered duplicate
    assert idx.events_applied == 1
    assert idx.apply(ev("late", 5, hashes=H[:1])).gap  # history cut at the head
    assert not idx.apply(ev("fresh", 9, "cleared")).gap  # cleared needs no history
    assert not idx.apply(ev("a", 7, "cleared")).gap
    assert not idx.apply(ev("a", 8, hashes=H[:2])).gap
    assert idx.gaps_detected == 1
    assert idx.drop_instance("a") and not idx.drop_instance("a")
    assert idx.matches(H) == {"late": 1}
    with pytest.raises(ValueError, match="unknown KV event"):
        idx.apply(ev("a", 9, "moved"))
    with pytest.raises(ValueError, match="malformed"):
        idx.apply(ev("late", 6, hashes=[H[1], "x"]))
    assert idx.instances["late"].last_seq == 5 and "a" not in idx.instances  # rejected: no change


# -- config -----------------------------------------------------------------------------------------


def test_config_from_args_and_env(monkeypatch) -> None:
    monkeypatch.setenv("XLLM_NATS", "nats://envhost:4222")
    monkeypatch.setenv("XLLM_REPLAY_TIMEOUT_S", "2.5")
    c = load_config(KvCacheConfig, [])
    assert (c.nats, c.replay_timeout_s, c.log_level) == ("nats://envhost:4222", 2.5, "info")
    c = load_config(KvCacheConfig, ["--nats", "nats://a:1,nats://b:2", "--log-level", "debug"])
    assert (c.nats, c.log_level) == ("nats://a:1,nats://b:2", "debug")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nats", "localhost:4222"], "expected nats://"),
        (["--log-level", "loud"], "--log-level"),
        (["--replay-timeout-s", "soon"], "expected float"),
        (["--replay-timeout-s", "-1"], "must be >= 0"),
    ],
)
def test_config_rejects_bad_values(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        load_config(KvCacheConfig, argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


TTL = 1.5

# -- the service over a real nats-server ------------------------------------------------------------


async def publish(js, events: list[KvEvent]) -> None:
    for e in events:
        await bus.publish(js, subjects.kv_events(e.instance_id), e)


async def started(nc, view: InstanceView, **kw) -> KvCacheService:
    svc = KvCacheService(KvCacheConfig(**kw), view)
    await asyncio.wait_for(svc.start(nc), 10)
    return svc


@pytest.fixture
async def view(nc):
    """A registry view of its own, with a TTL longer than any test: no instance departs unless removed."""
    view = await InstanceView.open(nc, bucket=f"kv_{uuid.uuid4().hex[:8]}", ttl=60)
    yield view
    await view.close()


async def ask(nc, tokens: list[int], block_size: int = BS) -> KvQueryReply:
    return await bus.request(nc, subjects.KVCACHE_QUERY, KvQuery("q-1", tokens, block_size), KvQueryReply, timeout=2)


@pytest.fixture
async def js(nc):
    js = nc.jetstream()
    await bus.ensure_stream(js, bus.KV_EVENTS)
    await js.purge_stream(subjects.KV_EVENTS_STREAM)  # every test starts from an empty history
    return js


@pytest.mark.integration
async def test_query_over_nats_and_replay_after_restart(nc, js, view) -> None:
    await publish(
        js,
        [
            ev("w-a", 1, hashes=H[:5]),
            ev("w-b", 1, hashes=H[:2]),
            ev("w-b", 2, hashes=H[:1], tier="host"),
            ev("w-a", 2, "removed", hashes=H[4:]),
        ],
    )
    svc = await started(nc, view)
    before = await ask(nc, PROMPT + [1, 2])  # a partial last block does not count
    assert before.matches == {"w-a": 4, "w-b": 2} and before.num_blocks == 6
    assert before.tiers == {"w-a": {"device": 4}, "w-b": {"device": 2}}
    assert before.request_id == "q-1" and before.error is None
    assert (svc.events_applied, svc.queries_served, svc.index_size) == (4, 1, 4)

    # Live: events published while serving reach the index.
    await publish(js, [ev("w-b", 3, hashes=H[2:6], parent=H[1])])

    async def applied() -> bool:
        return (await ask(nc, PROMPT)).matches.get("w-b") == 6

    await until(applied, 20, "live event not applied")
    live = await ask(nc, PROMPT)
    await svc.stop()

    restarted = await started(nc, view)  # a new process would do the same: replay from the first message
    assert restarted.events_applied == 5
    replayed = await ask(nc, PROMPT)
    assert (replayed.matches, replayed.tiers) == (live.matches, live.tiers)
    assert replayed.matches == {"w-a": 4, "w-b": 6}
    await restarted.stop()


@pytest.mark.integration
async def test_gap_in_sequence_detected_live_and_on_replay(nc, js, view) -> None:
    await publish(js, [ev("w-g", 1, hashes=H[:3]), ev("w-ok", 1, hashes=H[:3])])
    svc = await started(nc, view)
    assert (await ask(nc, PROMPT)).matches == {"w-g": 3, "w-ok": 3}
    await publish(js, [ev("w-g", 3, hashes=H[5:6], parent=H[4])])  # seq 2 never arrives
    await until(lambda: svc.gaps_detected, 20, "gap not detected")
    assert (await ask(nc, PROMPT)).matches == {"w-ok": 3}
    await svc.stop()

    again = await started(nc, view)
    assert again.gaps_detected == 1 and again.events_applied == 3
    assert (await ask(nc, PROMPT)).matches == {"w-ok": 3}
    await again.stop()


@pytest.mark.integration
async def test_bad_queries_and_events_get_clear_errors(nc, js, view) -> None:
    await nc.publish(subjects.kv_events("w-junk"), b"not msgpack")  # core publish still lands in the stream
    await publish(js, [ev("w-2", 1, hashes=["not", "ints"]), ev("w-1", 1, hashes=H[:1])])
    svc = await started(nc, view)
    assert svc.bad_events == 2 and svc.events_applied == 1
    reply = await ask(nc, PROMPT, block_size=0)
    assert reply.error and "block_size" in reply.error and reply.matches == {}
    raw = await nc.request(subjects.KVCACHE_QUERY, b"\x01\x02", timeout=2)
    assert "msgpack" in KvQueryReply.decode(raw.data).error
    assert (await ask(nc, PROMPT)).matches == {"w-1": 1}  # still serving
    await svc.stop()


@pytest.mark.integration
async def test_instances_that_leave_the_registry_are_dropped(nc, js) -> None:
    view = await InstanceView.open(nc, bucket=f"kv_{uuid.uuid4().hex[:8]}", ttl=TTL)
    live, dead, ghost = "w-live", "w-dead", "w-ghost"
    for iid in (live, dead):
        await view.registry.heartbeat(InstanceInfo(instance_id=iid, role="decode", model="m", pid=1, host="h"))
    await publish(js, [ev(live, 1, hashes=H[:2]), ev(dead, 1, hashes=H[:3]), ev(ghost, 1, hashes=H[:1])])
    async with Heartbeater(view.registry, lambda: InstanceInfo(live, "decode", "m", 1, "h"), interval=TTL / 4):
        svc = await started(nc, view)
        assert (await ask(nc, PROMPT)).matches == {live: 2, dead: 3, ghost: 1}
        await view.registry.remove(dead)  # a clean stop: dropped at once
        await view.wait(lambda: svc.instances_dropped == 1)
        assert (await ask(nc, PROMPT)).matches == {live: 2, ghost: 1}
        # Known from its events only: dropped once a TTL passes without its heartbeat.
        await view.wait(lambda: svc.instances_dropped == 2, timeout=TTL + 3)
        assert (await ask(nc, PROMPT)).matches == {live: 2}

        async def purged() -> bool:  # their histories are purged (a task after the drop)
            return (await js.stream_info(subjects.KV_EVENTS_STREAM)).state.messages == 1

        await until(purged, 20, "the departed instances' histories were not purged")
        await svc.stop()
    await view.close()


@pytest.mark.integration
def test_module_entry_point_serves_and_stops_on_sigterm(nats_server) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLLM_NATS": nats_server, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvcache", "--log-level", "info"],
        cwd=root,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        async def query_until_served() -> KvQueryReply:
            nc = await bus.connect(nats_server, "test")
            try:
                deadline = time.monotonic() + 15
                while True:
                    try:
                        return await ask(nc, PROMPT)
                    except bus.NoResponders:
                        assert time.monotonic() < deadline, "service never answered"
                        await asyncio.sleep(0.1)
            finally:
                await nc.close()

        assert asyncio.run(query_until_served()).error is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert '"service": "kvcache"' in proc.stderr.read()  # JSON lines: stderr is a pipe
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_module_entry_point_unreachable_nats_exits_1() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "XLLM_NATS_CONNECT_WAIT": "0.5"}
    url = f"nats://127.0.0.1:{free_port()}"
    r = subprocess.run(
        [sys.executable, "-m", "services.kvcache", "--nats", url],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and f"cannot reach NATS at {url}" in r.stderr

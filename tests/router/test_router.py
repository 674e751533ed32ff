"""The router over a real nats-server: fake registry entries, fake workers that ack, refuse or stay silent."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from pathlib import Path

import pytest

from services.router.config import RouterConfig
from services.router.service import RouterService
from shared import subjects
from shared.config import load_config
from shared.errors import invalid
from shared.messages import (
    AbortRequest,
    EncodeReply,
    EncodeRequest,
    GenerateRequest,
    InstanceInfo,
    RouteReply,
    StreamChunk,
)
from shared.registry import Heartbeater, InstanceRegistry
from tests.router.fakes import TTL, Cluster, FakeWorker, make_request
from tests.waiting import until

pytestmark = pytest.mark.integration


async def test_least_loaded_ready_instance_is_chosen_and_bursts_spread(cluster: Cluster) -> None:
    busy = await cluster.add("busy", running=3)
    idle = await cluster.add("idle")
    await cluster.add("starting", state="starting")  # idle too, but not ready: never chosen
    router = await cluster.start_router()

    picks = [(await cluster.send())[0].instances for _ in range(5)]
    assert picks[:3] == [[idle]] * 3  # 0, 1, 2 forwards < 3 running on "busy"
    assert [busy] in picks[3:]  # then its own forwards make "idle" as loaded as "busy"
    assert cluster.workers["starting"].received == []
    got = cluster.workers["idle"].received[0]
    assert (got.decode_instance, got.attempt, got.prompt_token_ids) == (None, 0, [1, 2, 3])
    assert router.routed == 5 and router.retries == 0


async def test_disaggregated_path_sets_the_decode_instance(cluster: Cluster) -> None:
    await cluster.add("p1", "prefill", running=2)
    p2 = await cluster.add("p2", "prefill")
    await cluster.add("d1", "decode", running=4)
    d2 = await cluster.add("d2", "decode", running=1)
    await cluster.add("c1")  # idle colocated: auto mode still takes prefill -> decode
    await cluster.start_router()

    reply, chunks = await cluster.send(priority=1)
    assert reply.error is None and reply.instances == [p2, d2]
    got = cluster.workers["p2"].received[0]
    assert got.decode_instance == d2 and got.priority == 1  # priority passes through
    assert cluster.workers["c1"].received == [] and chunks == []


async def test_a_decode_instance_an_attempt_could_not_reach_is_ranked_last_for_every_request(cluster: Cluster) -> None:
    """A prefill worker could not hand off to d1 (SIGKILLed: its registry entry stays until the TTL); the
    gateway's resubmission names it, and the router plans around it, for later requests too."""
    p1 = await cluster.add("p1", "prefill")
    d1 = await cluster.add("d1", "decode")
    d2 = await cluster.add("d2", "decode", running=4)
    await cluster.start_router()
    assert (await cluster.send())[0].instances == [p1, d1]  # the least loaded

    retry = make_request()
    retry.avoid, retry.attempt = [d1], 1
    assert (await cluster.send(retry))[0].instances == [p1, d2]
    assert (await cluster.send())[0].instances == [p1, d2]  # a new request, without `avoid`


async def test_colocated_mode_ignores_prefill_and_decode(cluster: Cluster) -> None:
    await cluster.add("p1", "prefill")
    await cluster.add("d1", "decode")
    c1 = await cluster.add("c1", running=5)
    await cluster.start_router(mode="colocated")
    assert (await cluster.send())[0].instances == [c1]
    assert cluster.workers["c1"].received[0].decode_instance is None


async def test_failover_past_absent_and_overloaded_instances(cluster: Cluster) -> None:
    await cluster.add("gone", behaviour="absent")  # best score, nobody listening: no responders
    await cluster.add(
        "full", running=1, behaviour="refuse", error={"message": "queue full", "type": "overloaded", "status": 429}
    )
    ok = await cluster.add("ok", running=2)
    router = await cluster.start_router()

    reply, chunks = await cluster.send()
    assert reply.error is None and reply.instances == [ok] and chunks == []
    assert [r.attempt for r in cluster.workers["full"].received] == [1]
    assert [r.attempt for r in cluster.workers["ok"].received] == [2]
    assert router.retries == 2 and router.routed == 1
    assert router.attempt_errors == {"no_responders": 1, "overloaded": 1}

    # The instance that did not answer is now tried last: the next request costs no failed attempt.
    reply, _ = await cluster.send()
    assert reply.instances == [ok]
    assert router.attempt_errors == {"no_responders": 1, "overloaded": 2}


async def test_failover_past_a_silent_instance_aborts_it(cluster: Cluster) -> None:
    await cluster.add("hung", behaviour="silent")
    ok = await cluster.add("ok", running=1)
    router = await cluster.start_router(ack_timeout_s=0.2)
    aborts: list[str] = []

    async def on_abort(msg) -> None:
        aborts.append(AbortRequest.decode(msg.data).request_id)

    sub = await cluster.nc.subscribe(subjects.ABORT, cb=on_abort)
    req = make_request()
    reply, _ = await cluster.send(req)
    await sub.unsubscribe()
    assert reply.instances == [ok] and router.attempt_errors == {"timeout": 1}
    assert aborts == [req.request_id]  # a late ack from "hung" must not mean two answers


async def test_a_worker_that_registers_after_the_router_started_takes_requests(cluster: Cluster) -> None:
    """The live view sees a new worker at its first heartbeat: it takes a request the instance the router
    knew before could not (seen when a worker was killed just after the system started)."""
    await cluster.add("dead", behaviour="absent")
    router = await cluster.start_router()
    late = await cluster.add("late", running=5)
    assert [i.instance_id for i in router.instances] == sorted([cluster.id("dead"), late])
    reply, chunks = await cluster.send()
    assert reply.error is None and reply.instances == [late] and chunks == []
    assert router.attempt_errors == {"no_responders": 1}


async def test_instance_whose_heartbeats_stop_leaves_the_pool(cluster: Cluster) -> None:
    quiet, loud = cluster.id("quiet"), cluster.id("loud")
    beats = [
        Heartbeater(cluster.registry, lambda: InstanceInfo(quiet, "colocated", "m", 1, "h"), interval=0.3),
        Heartbeater(cluster.registry, lambda: InstanceInfo(loud, "colocated", "m", 1, "h", running=3), interval=0.3),
    ]
    for b in beats:
        await b.beat()
        b.start()
    try:
        for name in ("quiet", "loud"):  # both keep acking: only the registry can tell them apart
            await cluster.add(name, running=3 if name == "loud" else 0)
        router = await cluster.start_router(recent_window_s=0.0)
        assert (await cluster.send())[0].instances == [quiet]

        await beats[0].stop(remove=False)  # as if the worker hung or was SIGKILLed
        took = await until(
            lambda: _listed_without(router, quiet), TTL + 2.5, "a silent instance stayed in the router's pool"
        )
        assert took > TTL - 0.6  # the TTL dropped it, not some early guess
        reply, _ = await cluster.send()
        assert reply.instances == [loud]
    finally:
        for b in beats:
            await b.stop(remove=False)


def _listed_without(router: RouterService, iid: str) -> bool:
    return bool(router.instances) and iid not in {i.instance_id for i in router.instances}


async def test_all_instances_over_the_waiting_cap_get_429_without_forwarding(cluster: Cluster) -> None:
    await cluster.add("a", waiting=4)
    await cluster.add("b", waiting=9)
    router = await cluster.start_router(max_waiting_per_instance=4, max_waiting_offline=2)

    req = make_request()
    reply, chunks = await cluster.send(req)
    assert reply.error["status"] == 429 and reply.error["type"] == "overloaded"
    assert len(chunks) == 1 and chunks[0].finished and chunks[0].error == reply.error
    assert chunks[0].request_id == req.request_id
    assert cluster.workers["a"].received == cluster.workers["b"].received == []
    assert router.failures == {"overloaded": 1}


async def test_offline_requests_meet_a_stricter_waiting_cap(cluster: Cluster) -> None:
    a = await cluster.add("a", waiting=3)
    await cluster.start_router(max_waiting_per_instance=4, max_waiting_offline=2)
    assert (await cluster.send(priority=0))[0].instances == [a]
    assert (await cluster.send(priority=1))[0].error["status"] == 429


async def test_every_instance_refusing_overloaded_fails_429_on_a_plain_publish(cluster: Cluster) -> None:
    full = {"message": "queue full", "type": "overloaded", "status": 429}
    for name in ("a", "b", "c", "d"):
        await cluster.add(name, behaviour="refuse", error=full)
    router = await cluster.start_router(max_attempts=3)
    req = make_request()
    chunks: asyncio.Queue = asyncio.Queue()

    async def on_chunk(msg) -> None:
        chunks.put_nowait(StreamChunk.decode(msg.data))

    sub = await cluster.nc.subscribe(req.reply_subject, cb=on_chunk)
    await cluster.nc.publish(subjects.ROUTER_GENERATE, req.encode())  # the gateway's way: no reply inbox
    chunk = await asyncio.wait_for(chunks.get(), 5)
    await sub.unsubscribe()
    assert chunk.finished and chunk.error["status"] == 429 and chunk.error["type"] == "overloaded"
    assert sum(len(w.received) for w in cluster.workers.values()) == 3  # bounded attempts
    assert router.retries == 2 and router.failures == {"overloaded": 1}


async def test_no_instances_fails_503(cluster: Cluster) -> None:
    await cluster.add("gone", behaviour="absent")
    router = await cluster.start_router()
    reply, chunks = await cluster.send()
    assert reply.error["status"] == 503 and reply.error["type"] == "server_error"
    assert chunks[0].error == reply.error
    await cluster.registry.remove(cluster.id("gone"))
    await cluster.view.wait(lambda: not router.instances)
    reply, _ = await cluster.send()
    assert reply.error["status"] == 503 and "no ready instances" in reply.error["message"]
    assert router.failures == {"unavailable": 1, "no_instances": 1}


async def test_invalid_request_refusal_is_passed_on_without_retry(cluster: Cluster) -> None:
    bad = invalid("max_tokens must be >= 1", "max_tokens").to_wire()
    await cluster.add("strict", behaviour="refuse", error=bad)
    await cluster.add("other", running=1)
    router = await cluster.start_router()
    reply, chunks = await cluster.send()
    assert reply.error == bad
    assert len(chunks) == 1 and chunks[0].finished and chunks[0].error == bad
    assert cluster.workers["other"].received == []
    assert router.retries == 0 and router.failures == {"rejected": 1}


async def test_undecodable_message_gets_a_400_reply(cluster: Cluster) -> None:
    await cluster.add("a")
    await cluster.start_router()
    answer = await cluster.nc.request(subjects.ROUTER_GENERATE, b"\x93not a request", timeout=5)
    reply = RouteReply.decode(answer.data)
    assert reply.error["status"] == 400 and "bad GenerateRequest" in reply.error["message"]


def test_config_flags_env_and_cross_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLLM_ROUTER_MODE", "colocated")
    config = load_config(RouterConfig, ["--max-attempts", "5", "--nats", "nats://n1:4222,nats://n2:4222"])
    assert (config.mode, config.max_attempts, config.max_waiting_per_instance) == ("colocated", 5, 64)
    with pytest.raises(SystemExit):
        load_config(RouterConfig, ["--max-waiting-per-instance", "8"])  # offline cap 32 > 8
    with pytest.raises(SystemExit):
        load_config(RouterConfig, ["--mode", "sideways"])


async def test_python_m_services_router_serves_and_stops_on_sigterm(nc, nats_server: str) -> None:
    iid = f"main-{uuid.uuid4().hex[:6]}"
    registry = await InstanceRegistry.open(nc.jetstream())  # the default bucket, as in production
    worker = FakeWorker(iid)
    sub = await nc.subscribe(subjects.worker_generate(iid), cb=worker.on_msg)
    beats = Heartbeater(registry, lambda: InstanceInfo(iid, "colocated", "m", 1, "h"), interval=1.0)
    await beats.beat()
    beats.start()  # alive however long the router process takes to start
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.router",
        "--nats",
        nats_server,
        "--mode",
        "colocated",
        cwd=Path(__file__).resolve().parents[2],
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def routed() -> bool:
            try:
                answer = await nc.request(subjects.ROUTER_GENERATE, make_request().encode(), timeout=0.5)
            except Exception:  # not subscribed yet
                return False
            return RouteReply.decode(answer.data).instances == [iid]

        await until(routed, 15, "the router process never routed a request")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        stderr = (await proc.stderr.read()).splitlines()
        lines = [json.loads(line) for line in stderr if line.startswith(b"{")]
        routed_lines = [e for e in lines if e["event"] == "routed"]  # JSON lines when not on a terminal
        assert routed_lines and all(e["request_id"] and e["service"] == "router" for e in routed_lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sub.unsubscribe()
        await beats.stop(remove=True)


# ---- EPD: images encoded by an encoder instance -----------------------------------------------------
def image_request() -> GenerateRequest:
    req = make_request()
    req.images = [{"offset": 0, "length": 3, "hash": "ab" * 32, "pixels": b"\0" * 12, "shape": [2, 2, 3]}]
    return req


async def fake_encoder(cluster: Cluster, name: str, answer: bool) -> tuple[str, asyncio.Event]:
    """An encoder instance that answers with a handle, or takes the request and never answers."""
    iid = await cluster.add(name, role="encoder", behaviour="absent")
    asked = asyncio.Event()

    async def on_encode(msg) -> None:
        asked.set()
        if answer:
            request = EncodeRequest.decode(msg.data)
            handles = [{"hash": image["hash"], "name": "seg", "host": "h"} for image in request.images]
            await msg.respond(EncodeReply(request.request_id, iid, handles).encode())

    cluster._subs.append(await cluster.nc.subscribe(subjects.encoder_encode(iid), cb=on_encode))
    return iid, asked


async def test_images_go_to_an_encoder_first_and_its_handles_on_to_the_worker(cluster: Cluster) -> None:
    await fake_encoder(cluster, "enc", answer=True)
    await cluster.add("w")
    router = await cluster.start_router(encode="always")
    reply, _ = await cluster.send(image_request())
    assert reply.instances == [cluster.id("w")]
    (req,) = cluster.workers["w"].received
    assert req.images[0]["embedding"] == {"hash": "ab" * 32, "name": "seg", "host": "h"}
    assert router.stats()["encodes"] == {"encoder": 1}


async def test_an_encoder_that_dies_mid_request_leaves_the_images_to_the_worker(cluster: Cluster) -> None:
    """The router stops waiting when the encoder leaves the registry, long before its timeout."""
    iid, asked = await fake_encoder(cluster, "enc", answer=False)
    await cluster.add("w")
    router = await cluster.start_router(encode="always", encode_timeout_s=120.0)
    sending = asyncio.create_task(cluster.send(image_request()))
    await asyncio.wait_for(asked.wait(), 10)
    await cluster.registry.remove(iid)  # what its TTL does once it stops heartbeating
    reply, _ = await asyncio.wait_for(sending, 10)
    assert reply.instances == [cluster.id("w")]
    assert "embedding" not in cluster.workers["w"].received[0].images[0]
    assert router.stats()["encodes"] == {"fallback": 1}

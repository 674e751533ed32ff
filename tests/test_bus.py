"""shared.bus (connect, streams, request/reply) and shared.logging (structured lines with request ids)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import nats.js.errors
import pytest
import structlog

from shared import bus
from shared.logging import bind_request, configure_logging, get_logger
from shared.messages import AbortRequest, KvQuery, KvQueryReply, SchemaError
from xllm.natsd import free_port

# -- connect ----------------------------------------------------------------------------------------


async def test_connect_unreachable_is_a_clear_error() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(bus.BusError, match=f"cannot reach NATS at {url}"):
        await bus.connect(url, "test", connect_wait_s=0.5, connect_timeout_s=0.2)
    assert time.monotonic() - t0 < 5


async def test_connect_empty_url() -> None:
    with pytest.raises(bus.BusError, match="no NATS URL"):
        await bus.connect(" , ", "test")


@pytest.mark.integration
async def test_connect_then_reconnects_forever(nats_server) -> None:
    nc = await bus.connect(nats_server, "test")
    try:
        assert nc.is_connected
        assert nc.options["max_reconnect_attempts"] == -1
        assert nc.options["name"] == "test"
    finally:
        await nc.close()


# -- streams ----------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_ensure_streams_creates_all_with_limits_and_is_idempotent(nc) -> None:
    js = nc.jetstream()
    await bus.ensure_streams(js)
    await bus.ensure_streams(js)  # again: no error
    for spec in bus.STREAMS:
        info = await js.stream_info(spec.name)
        assert info.config.subjects == spec.subjects
        assert info.config.max_age == pytest.approx(spec.max_age_s)
        assert info.config.max_bytes == spec.max_bytes
    ack = await js.publish("xllm.kv.events.w1", b"x")
    assert ack.stream == "XLLM_KV_EVENTS"
    ack = await js.publish("xllm.jobs.results.j1", b"x")
    assert ack.stream == "XLLM_JOB_RESULTS"


@pytest.mark.integration
async def test_ensure_stream_updates_an_older_config(nc) -> None:
    js = nc.jetstream()
    spec = bus.StreamSpec(f"T_{uuid.uuid4().hex[:8]}", ["upd.a"], max_age_s=60.0, max_bytes=1 << 20)
    await bus.ensure_stream(js, spec)
    newer = bus.StreamSpec(spec.name, ["upd.a", "upd.b"], max_age_s=120.0, max_bytes=2 << 20)
    await bus.ensure_stream(js, newer)
    info = await js.stream_info(spec.name)
    assert info.config.subjects == ["upd.a", "upd.b"]
    assert info.config.max_age == pytest.approx(120.0)
    await js.delete_stream(spec.name)


@pytest.mark.integration
async def test_publish_dedupes_by_msg_id(nc) -> None:
    js = nc.jetstream()
    spec = bus.StreamSpec(f"T_{uuid.uuid4().hex[:8]}", ["dedup.x"], max_age_s=60.0, max_bytes=1 << 20)
    await bus.ensure_stream(js, spec)
    s1 = await bus.publish(js, "dedup.x", AbortRequest("r1"), msg_id="m1")
    s2 = await bus.publish(js, "dedup.x", AbortRequest("r1"), msg_id="m1")
    s3 = await bus.publish(js, "dedup.x", AbortRequest("r2"))
    assert s1 == s2 and s3 == s1 + 1
    assert AbortRequest.decode((await js.get_msg(spec.name, s3)).data).request_id == "r2"
    await js.delete_stream(spec.name)
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info(spec.name)


# -- request / reply --------------------------------------------------------------------------------


@pytest.mark.integration
async def test_request_reply_with_message_types(nc) -> None:
    subject = f"test.echo.{uuid.uuid4().hex}"

    async def handler(msg):
        q = KvQuery.decode(msg.data)
        await bus.respond(msg, KvQueryReply(request_id=q.request_id, num_blocks=len(q.token_ids)))

    await nc.subscribe(subject, queue="q", cb=handler)
    reply = await bus.request(nc, subject, KvQuery("r7", [1, 2, 3], 16), KvQueryReply, timeout=2)
    assert reply == KvQueryReply(request_id="r7", num_blocks=3)
    with pytest.raises(SchemaError, match="kind"):  # answered with another message type
        await bus.request(nc, subject, KvQuery("r8", [], 16), AbortRequest, timeout=2)


@pytest.mark.integration
async def test_request_errors_say_why(nc) -> None:
    with pytest.raises(bus.NoResponders, match="no service answers"):
        await bus.request(nc, f"test.nobody.{uuid.uuid4().hex}", AbortRequest("r"), AbortRequest, timeout=1)
    silent = f"test.silent.{uuid.uuid4().hex}"

    async def ignore(msg):
        pass

    await nc.subscribe(silent, cb=ignore)
    with pytest.raises(bus.RequestTimeout, match=r"within 0\.2s"):
        await bus.request(nc, silent, AbortRequest("r"), AbortRequest, timeout=0.2)


# -- logging ----------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()


def _json_lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


async def test_logging_json_lines_carry_service_pid_and_request_id(capsys, restore_logging) -> None:
    configure_logging("router", "info", json=True)
    log = get_logger("t")

    async def handle(rid: str) -> None:
        with bind_request(rid):
            await asyncio.sleep(0.01)  # interleave the two requests
            log.info("step", n=1)
            await asyncio.create_task(asyncio.sleep(0))  # a child task
            logging.getLogger("nats").warning("from stdlib")

    await asyncio.gather(handle("req-a"), handle("req-b"))
    log.info("outside")
    log.debug("hidden at info")
    lines = _json_lines(capsys.readouterr().err)
    assert [ln["event"] for ln in lines].count("step") == 2
    for ln in lines:
        assert ln["service"] == "router" and isinstance(ln["pid"], int)
    for rid in ("req-a", "req-b"):
        mine = [ln for ln in lines if ln.get("request_id") == rid]
        assert {ln["event"] for ln in mine} == {"step", "from stdlib"}
    outside = [ln for ln in lines if ln["event"] == "outside"]
    assert len(outside) == 1 and "request_id" not in outside[0]
    assert not [ln for ln in lines if ln["event"] == "hidden at info"]


def test_logging_console_on_terminal_and_bad_level(capsys, restore_logging) -> None:
    configure_logging("gateway", "debug", json=False)
    with bind_request("r-9"):
        get_logger("t").debug("hello")
    err = capsys.readouterr().err
    assert "hello" in err and "request_id=r-9" in err and "service=gateway" in err
    assert not err.lstrip().startswith("{")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("gateway", "loud")

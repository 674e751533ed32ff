"""NATS plumbing every service shares: connect, JetStream streams, request/reply with Message types.

    nc = await connect(config.nats_url, name="router")
    js = nc.jetstream()
    await ensure_streams(js)                      # idempotent: any service may call it at start
    reply = await request(nc, KVCACHE_QUERY, KvQuery(...), KvQueryReply, timeout=0.5)

A service waits a while for NATS at start (compose starts containers in any order), then fails with a
clear `BusError`; once connected it reconnects forever, buffering what it publishes meanwhile.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from shared import subjects
from shared.logging import get_logger
from shared.messages import Message

log = get_logger("xllm.bus")

M = TypeVar("M", bound=Message)

CONNECT_WAIT_S = 10.0  # how long a starting service waits for NATS before giving up
RECONNECT_WAIT_S = 0.5
REQUEST_TIMEOUT_S = 5.0

MiB = 1024 * 1024
HOUR = 3600.0


class BusError(RuntimeError):
    """NATS is unreachable, or a request got no (timely) answer."""


class NoResponders(BusError):
    """Nobody subscribes to the subject: the service is down (retry elsewhere or fail fast)."""


class RequestTimeout(BusError):
    """A responder exists but did not answer in time."""


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream this system relies on, with retention limits (never unbounded)."""

    name: str
    subjects: list[str]
    max_age_s: float
    max_bytes: int
    max_msg_size: int = -1  # -1: the server's max_payload


# KV events: the kvcache service replays these after a restart, so keep a day; an instance's head
# of history may still be cut by max_bytes, and the service detects that as a sequence gap.
# Jobs and results: kept a week so results can be fetched after the fact.
KV_EVENTS = StreamSpec(subjects.KV_EVENTS_STREAM, [f"{subjects.KV_EVENTS_PREFIX}.>"], 24 * HOUR, 512 * MiB)
JOBS = StreamSpec(subjects.JOBS_STREAM, [subjects.JOBS_SUBMIT], 7 * 24 * HOUR, 1024 * MiB)
JOB_RESULTS = StreamSpec(subjects.JOB_RESULTS_STREAM, [f"{subjects.JOB_RESULTS_PREFIX}.>"], 7 * 24 * HOUR, 1024 * MiB)
STREAMS: tuple[StreamSpec, ...] = (KV_EVENTS, JOBS, JOB_RESULTS)


@dataclass
class _Hooks:
    lost: list[Callable[[], None]] = field(default_factory=list)
    restored: list[Callable[[], None]] = field(default_factory=list)


_hooks: weakref.WeakKeyDictionary[Client, _Hooks] = weakref.WeakKeyDictionary()


def on_connection(
    nc: Client, *, lost: Callable[[], None] | None = None, restored: Callable[[], None] | None = None
) -> None:
    """Call `lost()` when `nc` (made by `connect`) loses its server, `restored()` once it is connected again.

    Core NATS does not keep what was published to a subject while a subscriber was away, and consumers
    a restarted server forgot are not there: whoever depends on either acts on `restored`.
    """
    hooks = _hooks.setdefault(nc, _Hooks())
    if lost is not None:
        hooks.lost.append(lost)
    if restored is not None:
        hooks.restored.append(restored)


def _run_hooks(nc: Client, which: str) -> None:
    for hook in getattr(_hooks.get(nc), which, []):
        try:
            hook()
        except Exception:  # one listener's bug must not keep the others from hearing
            log.exception("connection_hook_failed", hook=which)


async def connect(
    url: str, name: str, *, connect_wait_s: float | None = None, connect_timeout_s: float = 2.0
) -> Client:
    """Connect to NATS at `url` (comma-separated for a cluster); raise BusError if unreachable.

    `connect_wait_s` defaults to env XLLM_NATS_CONNECT_WAIT, else CONNECT_WAIT_S.
    """
    if connect_wait_s is None:
        connect_wait_s = float(os.environ.get("XLLM_NATS_CONNECT_WAIT", CONNECT_WAIT_S))
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise BusError("no NATS URL given (use --nats nats://host:4222 or XLLM_NATS)")

    nc = Client()
    try:
        await nc.connect(
            servers=servers,
            name=name,
            connect_timeout=connect_timeout_s,
            reconnect_time_wait=RECONNECT_WAIT_S,
            # Bounded tries at start, so a wrong URL fails with a message instead of hanging...
            max_reconnect_attempts=max(1, int(connect_wait_s / RECONNECT_WAIT_S)),
            ping_interval=10,
            max_outstanding_pings=3,
            **_callbacks(nc),
        )
    except (nats.errors.Error, OSError, TimeoutError) as e:
        raise BusError(
            f"cannot reach NATS at {url} after {connect_wait_s:.0f}s ({type(e).__name__}: {e}); is nats-server running?"
        ) from e
    # ...then reconnect forever: a service outlives a NATS restart or a cluster node failover.
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _callbacks(nc: Client) -> dict[str, Any]:
    """nats-py's connection callbacks: log, and tell the hooks of `on_connection`."""

    async def on_error(e: Exception) -> None:
        log.warning("nats_error", error=f"{type(e).__name__}: {e}")

    async def on_disconnected() -> None:
        if not nc.is_closed:  # a close() we asked for is not news
            log.warning("nats_disconnected")
            _run_hooks(nc, "lost")

    async def on_reconnected() -> None:
        log.info("nats_reconnected", url=nc.connected_url.netloc if nc.connected_url else None)
        _run_hooks(nc, "restored")

    return {"error_cb": on_error, "disconnected_cb": on_disconnected, "reconnected_cb": on_reconnected}


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    """Create the stream, or bring an existing one's subjects and limits up to `spec`."""
    config = StreamConfig(
        name=spec.name,
        subjects=spec.subjects,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        max_msg_size=spec.max_msg_size,
        duplicate_window=min(120.0, spec.max_age_s),  # the server wants it <= max_age
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with another config (an older release, or limits an operator changed).
        try:
            await js.update_stream(config)
        except nats.js.errors.APIError as e:
            log.warning("stream_config_not_updated", stream=spec.name, reason=e.description)


async def ensure_streams(js: JetStreamContext, specs: tuple[StreamSpec, ...] = STREAMS) -> None:
    for spec in specs:
        await ensure_stream(js, spec)


async def request(
    nc: Client, subject: str, msg: Message, reply_type: type[M], *, timeout: float = REQUEST_TIMEOUT_S
) -> M:
    """Send `msg`, decode the answer as `reply_type` (SchemaError if it is something else)."""
    try:
        answer = await nc.request(subject, msg.encode(), timeout=timeout)
    except nats.errors.NoRespondersError as e:
        raise NoResponders(f"no service answers on {subject}") from e
    except nats.errors.TimeoutError as e:
        raise RequestTimeout(f"no answer on {subject} within {timeout}s") from e
    return reply_type.decode(answer.data)


async def respond(msg: Msg, reply: Message) -> None:
    """Answer a request received on a subscription (no-op for a plain publish without reply inbox)."""
    if msg.reply:
        await msg.respond(reply.encode())


async def publish(
    js: JetStreamContext, subject: str, msg: Message, *, msg_id: str | None = None, timeout: float = REQUEST_TIMEOUT_S
) -> int:
    """Publish to a stream and wait for the ack; returns the stream sequence.

    `msg_id` lets JetStream drop a retried duplicate within the stream's duplicate window.
    """
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    ack = await js.publish(subject, msg.encode(), timeout=timeout, headers=headers)
    return ack.seq

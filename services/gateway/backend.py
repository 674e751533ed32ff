"""The gateway's side of the bus: route a request's attempts, receive their chunks, abort them.

One wildcard subscription (`<inbox>.*`) receives the chunks of every request of this gateway; each
attempt's reply subject is `<inbox>.<attempt id>`, so sending needs no per-request SUB round trip.
An attempt's queue gets its chunks, and a `Lost` when an instance holding it leaves the registry or
NATS came back after a loss; generation.py decides what happens then (failover).
"""

import asyncio
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import structlog

from shared import bus, subjects
from shared.errors import ApiError
from shared.messages import AbortRequest, GenerateRequest, RouteReply, SchemaError, StreamChunk

log = structlog.get_logger("xllm.gateway")

ROUTE_TIMEOUT_S = 10.0  # the router tries a few workers, each with a ~2 s ack timeout
RECOVERY_S = 15.0  # after a NATS reconnection, how long resubmissions wait for routers and workers


@dataclass
class Lost:
    """Put in an attempt's queue when one of its instances left the registry ("" : the bus reconnected)."""

    instance_id: str

    @property
    def reason(self) -> str:
        if not self.instance_id:
            return "the message bus reconnected (chunks may have been lost)"
        return f"instance {self.instance_id} left the registry"


@dataclass
class Attempt:
    """One submission of a request: its own request id, reply queue and instances."""

    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    instances: list[str] = field(default_factory=list)  # from the RouteReply
    watch: set[str] = field(default_factory=set)  # the instances whose leaving ends this attempt
    started: bool = False  # a chunk arrived
    lost: bool = False
    next_seq: int = 0  # StreamChunk.seq expected next
    early: dict[int, StreamChunk] = field(default_factory=dict)  # chunks that overtook an earlier one


class Backend:
    def __init__(
        self,
        nc: Any,
        retry_after_s: int = 1,
        *,
        view: Any | None = None,
        max_submissions: int = 3,
        route_timeout_s: float = ROUTE_TIMEOUT_S,
    ):
        self.nc = nc
        self.retry_after_s = retry_after_s
        self.view = view  # the process's InstanceView (or anything with `on_gone` and `expect`); None: no watch
        self.max_submissions = max_submissions
        self.route_timeout_s = route_timeout_s
        self.restored_at = -RECOVERY_S  # monotonic time NATS last came back
        self.on_failover: Callable[[str], None] | None = None  # told each failover's cause (metrics)
        self._inbox = ""
        self._attempts: dict[str, Attempt] = {}
        self._sub: Any = None

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        # Unbounded pending on the subscription: each stream is bounded by its request's max_tokens,
        # and dropping a chunk (slow consumer) would corrupt an answer.
        self._sub = await self.nc.subscribe(
            f"{self._inbox}.*", cb=self._on_chunk, pending_msgs_limit=0, pending_bytes_limit=0
        )
        if self.view is not None:
            self.view.on_gone.append(self._instance_gone)
        bus.on_connection(self.nc, restored=self._bus_restored)

    async def close(self) -> None:
        if self.view is not None and self._instance_gone in self.view.on_gone:
            self.view.on_gone.remove(self._instance_gone)
        if self._sub is not None:
            with suppress(Exception):  # a closed connection has no subscription left to drop
                await self._sub.unsubscribe()
            self._sub = None

    def recovering(self) -> bool:
        """NATS came back a moment ago: routers and workers may still be reconnecting."""
        return time.monotonic() - self.restored_at < RECOVERY_S

    @property
    def active(self) -> int:
        return len(self._attempts)

    # -- attempts ---------------------------------------------------------------------------------

    async def route(self, req: GenerateRequest) -> Attempt | None:
        """Register an attempt for `req` and send it to the router: the Attempt, or None when the
        router did not answer in time (the caller may try again). Router refusals raise ApiError."""
        attempt = Attempt(req.request_id)
        self._attempts[req.request_id] = attempt
        req.reply_subject = f"{self._inbox}.{req.request_id}"
        try:
            reply = await bus.request(self.nc, subjects.ROUTER_GENERATE, req, RouteReply, timeout=self.route_timeout_s)
        except bus.NoResponders:
            await self.release(attempt, abort=False)
            raise ApiError(
                503, "no router is running; retry later", "server_error", None, "router_unavailable", self.retry_after_s
            ) from None
        except bus.RequestTimeout:
            await self.release(attempt, abort=True)  # the router may still place it: cancel that
            log.warning("route_timeout", timeout_s=self.route_timeout_s)
            return None
        except SchemaError as e:
            await self.release(attempt, abort=True)
            raise ApiError(502, f"bad reply from the router: {e}", "server_error") from None
        except nats.errors.MaxPayloadError:  # its images, prepared, do not fit one message of this bus
            await self.release(attempt, abort=False)
            raise ApiError(
                413,
                f"the request is too large for the message bus (its limit is {self.nc.max_payload} bytes a message: "
                "fewer or smaller images)",
                "invalid_request_error",
                "messages",
                "request_too_large",
            ) from None
        except Exception as e:  # connection closed / draining: nothing was sent
            await self.release(attempt, abort=False)
            log.warning("publish_failed", error=repr(e))
            raise ApiError(
                503,
                "the message bus is unavailable; retry later",
                "server_error",
                None,
                "bus_unavailable",
                self.retry_after_s,
            ) from None
        if reply.error:
            await self.release(attempt, abort=False)
            raise ApiError.from_wire(reply.error, self.retry_after_s)
        attempt.instances = list(reply.instances)
        attempt.watch = set(reply.instances)
        if self.view is not None:
            for instance_id in reply.instances:  # one this view has not seen yet must show up in time
                self.view.expect(instance_id)
        return attempt

    async def release(self, attempt: Attempt, abort: bool) -> None:
        """Forget an attempt; `abort` tells every worker to drop it (a no-op where it is not)."""
        if self._attempts.pop(attempt.request_id, None) is not None and abort:
            await self.abort(attempt.request_id)

    async def abort(self, request_id: str) -> None:
        try:
            await self.nc.publish(subjects.ABORT, AbortRequest(request_id).encode())
            log.info("request_aborted", request_id=request_id)
        except Exception as e:
            log.warning("abort_publish_failed", request_id=request_id, error=repr(e))

    async def _on_chunk(self, msg: Any) -> None:
        attempt = self._attempts.get(msg.subject.rpartition(".")[2])
        if attempt is not None:  # else: a late chunk of an attempt already ended
            attempt.queue.put_nowait(msg.data)

    def _instance_gone(self, instance_id: str) -> None:
        for attempt in self._attempts.values():
            if instance_id in attempt.watch:
                self._lose(attempt, instance_id)

    def _bus_restored(self) -> None:
        self.restored_at = time.monotonic()
        for attempt in self._attempts.values():
            if attempt.instances:  # routed: its chunks travel the bus
                self._lose(attempt, "")

    @staticmethod
    def _lose(attempt: Attempt, instance_id: str) -> None:
        if not attempt.lost:
            attempt.lost = True
            attempt.queue.put_nowait(Lost(instance_id))

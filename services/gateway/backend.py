"""The gateway's side of the bus: route a request, receive its chunks, fail over, abort.

One wildcard subscription (`<inbox>.*`) receives the chunks of every request of this gateway; each
attempt's reply subject is `<inbox>.<attempt id>`, so sending needs no per-request SUB round trip.

Failover ("nothing in flight is lost when a worker dies"). The request goes to the router as a NATS
request; its RouteReply names the instances now holding it. The request moves elsewhere when
  - one of those instances leaves the registry (the process's live view says so: its entry was removed
    or its heartbeats stopped for the TTL), or
  - a worker sends a retriable error chunk (it cannot go on; another instance may), or
  - this gateway's NATS connection came back after a loss: chunks published meanwhile are gone (core
    NATS keeps none), so every request in flight goes on from what reached it,
by resubmitting it (attempt + 1), at most `max_submissions` submissions in all, then a clear 503; for
`RECOVERY_S` after a reconnection, a resubmission that finds no router or no instance yet (they are
reconnecting too) is tried again with backoff and not counted.
Before any output the same request goes again. After output (n == 1) it continues: prompt = prompt
+ the tokens generated so far, max_tokens and min_tokens reduced by their number, so the client's
stream goes on where it stopped. A seeded or penalised request may then differ from an uninterrupted
run: the new worker's sampler starts afresh and sees those tokens as prompt. With n > 1 a caller
that has sent nothing yet (non-streaming) may start over (`on_restart`); otherwise it is a 503.

Every attempt has its own request id, `<id>-r<k>` (the first keeps `<id>`): chunks still in flight
from the old attempt (its worker may only have been slow to heartbeat) land on a reply subject that
nobody reads and are dropped, and the abort sent for the old attempt cannot cancel the new one.
Log lines carry the attempt's id, whose prefix is the client's request id.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

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
    def __init__(self, nc: Any, retry_after_s: int = 1, *, view: Any | None = None, max_submissions: int = 3,
                 route_timeout_s: float = ROUTE_TIMEOUT_S):
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
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_chunk, pending_msgs_limit=0,
                                            pending_bytes_limit=0)
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

    @asynccontextmanager
    async def open(self, req: GenerateRequest, first_timeout: float, inter_timeout: float,
                   on_restart: Callable[[], None] | None = None) -> AsyncIterator["Generation"]:  # fmt: skip
        """Route `req` and yield its Generation. Leaving before the last chunk (client gone, timeout,
        error) aborts the current attempt, so workers free its KV blocks."""
        gen = Generation(self, req, first_timeout, inter_timeout, on_restart)
        try:
            await gen.start()
            yield gen
        finally:
            if gen.attempt is not None:
                await self.release(gen.attempt, abort=not gen.finished)

    # -- attempts ---------------------------------------------------------------------------------

    async def route(self, req: GenerateRequest) -> Attempt | None:
        """Register an attempt for `req` and send it to the router: the Attempt, or None when the
        router did not answer in time (the caller may try again). Router refusals raise ApiError."""
        attempt = Attempt(req.request_id)
        self._attempts[req.request_id] = attempt
        req.reply_subject = f"{self._inbox}.{req.request_id}"
        try:
            reply = await bus.request(self.nc, subjects.ROUTER_GENERATE, req, RouteReply,
                                      timeout=self.route_timeout_s)
        except bus.NoResponders:
            await self.release(attempt, abort=False)
            raise ApiError(503, "no router is running; retry later", "server_error", None, "router_unavailable",
                           self.retry_after_s) from None  # fmt: skip
        except bus.RequestTimeout:
            await self.release(attempt, abort=True)  # the router may still place it: cancel that
            log.warning("route_timeout", timeout_s=self.route_timeout_s)
            return None
        except SchemaError as e:
            await self.release(attempt, abort=True)
            raise ApiError(502, f"bad reply from the router: {e}", "server_error") from None
        except Exception as e:  # connection closed / draining: nothing was sent
            await self.release(attempt, abort=False)
            log.warning("publish_failed", error=repr(e))
            raise ApiError(503, "the message bus is unavailable; retry later", "server_error", None,
                           "bus_unavailable", self.retry_after_s) from None  # fmt: skip
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


class Generation:
    """A request's output across attempts: `next()` returns its chunks in order, failover hidden.

    `finished` once the last chunk was returned; `attempt` is the submission now running.
    """

    def __init__(self, backend: Backend, req: GenerateRequest, first_timeout: float, inter_timeout: float,
                 on_restart: Callable[[], None] | None = None):  # fmt: skip
        self.backend, self.req = backend, req
        self.first_timeout, self.inter_timeout = first_timeout, inter_timeout
        self.on_restart = on_restart
        self.attempt: Attempt | None = None
        self.submissions = 0
        self.generated: list[int] = []  # n == 1: token ids returned so far (a continuation's prompt tail)
        self.produced = False  # output reached the caller
        self.finished = False

    async def start(self) -> None:
        if not await self._submit():
            await self._fail_over("the router did not answer", "router_timeout")

    async def next(self) -> StreamChunk:
        """The next chunk; ApiError 504 when none comes in time, 503 when failover is exhausted."""
        while True:
            if (chunk := self.attempt.early.pop(self.attempt.next_seq, None)) is not None:
                return self._accept(chunk)
            item = await self._get()
            if isinstance(item, Lost):
                if not item.instance_id and self.produced and self.req.params.get("n", 1) != 1 \
                        and self.on_restart is None:
                    # Streamed n > 1 output cannot be continued elsewhere: better to hope nothing was lost.
                    self.attempt.lost = False
                    continue
                why, cause = item.reason, "instance_left" if item.instance_id else "bus_reconnected"
            else:
                try:
                    chunk = StreamChunk.decode(item)
                except SchemaError as e:
                    raise ApiError(502, f"bad reply from the serving backend: {e}", "server_error") from None
                err = chunk.error and ApiError.from_wire(chunk.error)
                if not err and chunk.seq > self.attempt.next_seq:  # the decode worker's overtook the prefill's
                    self.attempt.early[chunk.seq] = chunk
                    continue
                if not (err and err.retriable and chunk.instance_id):  # a worker's "I cannot go on"
                    return self._accept(chunk)
                why, cause = f"instance {chunk.instance_id}: {err.message}", "worker_error"
            last = await self._fail_over(why, cause)
            if last is not None:
                return self._accept(last)

    async def _get(self) -> Any:
        attempt = self.attempt
        timeout = self.inter_timeout if attempt.started else self.first_timeout
        try:
            item = await asyncio.wait_for(attempt.queue.get(), timeout)
        except TimeoutError:
            waiting_for = "output" if self.produced else "first output"
            raise ApiError(504, f"no {waiting_for} from the serving backend within {timeout:g} s",
                           "server_error", None, "timeout") from None  # fmt: skip
        attempt.started = attempt.started or not isinstance(item, Lost)
        return item

    def _accept(self, chunk: StreamChunk) -> StreamChunk:
        attempt, prompt_len = self.attempt, len(self.req.prompt_token_ids)
        attempt.next_seq = max(attempt.next_seq, chunk.seq + 1)
        if attempt.request_id != self.req.request_id:  # usage counts the client's prompt, not ours
            chunk.prompt_tokens, chunk.cached_tokens = prompt_len, min(chunk.cached_tokens, prompt_len)
        if any(o.get("token_ids") or o.get("text") for o in chunk.outputs):
            self.produced = True
            # Once the instance that streams to the end (decode, or the colocated one) streams, only it
            # matters; the prefill worker's first tokens leave both watched until the hand-off is done.
            if attempt.instances and chunk.instance_id == attempt.instances[-1]:
                attempt.watch = {chunk.instance_id}
            if self.req.params.get("n", 1) == 1:
                self.generated.extend(t for o in chunk.outputs if o.get("index", 0) == 0 for t in o["token_ids"])
        self.finished = self.finished or chunk.finished
        return chunk

    async def _fail_over(self, why: str, cause: str) -> StreamChunk | None:
        """Resubmit elsewhere; a final chunk when nothing is left to generate, else None. `cause` is a
        short label for metrics ("instance_left", "worker_error", "bus_reconnected", "router_timeout",
        "router_refused")."""
        backoff = 0.05
        while True:
            await self.backend.release(self.attempt, abort=True)
            log.warning("failover", reason=why, attempts=self.submissions, generated=len(self.generated))
            if self.backend.on_failover is not None:
                self.backend.on_failover(cause)
            if self.submissions >= self.backend.max_submissions and not self.backend.recovering():
                raise ApiError(503, f"the request failed on {self.submissions} attempts (last: {why}); "
                               "retry later", "server_error", None, "worker_unavailable",
                               self.backend.retry_after_s)  # fmt: skip
            if self.produced and self.req.params.get("n", 1) != 1:
                if self.on_restart is None:
                    raise ApiError(503, f"the request was interrupted after producing output ({why}); "
                                   "a request with n > 1 cannot be continued elsewhere", "server_error",
                                   None, "worker_unavailable", self.backend.retry_after_s)  # fmt: skip
                self.on_restart()  # the caller sent nothing yet: start over
                self.produced = False
            max_tokens = self.req.params.get("max_tokens")
            if max_tokens is not None and len(self.generated) >= max_tokens:  # all there but the finish
                return StreamChunk(self.req.request_id, [{"index": 0, "token_ids": [], "text": "",
                                                          "finish_reason": "length"}], finished=True)  # fmt: skip
            try:
                if await self._submit():
                    return None
                why, cause = "the router did not answer", "router_timeout"
            except ApiError as e:  # refused: final, unless routers and workers are still reconnecting
                if not (e.status == 503 and self.backend.recovering()):
                    raise
                why, cause = e.message, "router_refused"
            if self.backend.recovering():
                await asyncio.sleep(backoff)
                backoff = min(1.0, 2 * backoff)

    async def _submit(self) -> bool:
        """Route the next attempt: False when the router did not answer (ApiError when it refused)."""
        k, base = self.submissions, self.req
        req = replace(base, request_id=base.request_id if k == 0 else f"{base.request_id}-r{k}",
                      attempt=base.attempt + k, decode_instance=None)  # fmt: skip
        if self.generated:  # continue after the tokens the caller already has
            done, params = len(self.generated), dict(base.params)
            if params.get("max_tokens") is not None:
                params["max_tokens"] -= done
            params["min_tokens"] = max(0, params.get("min_tokens", 0) - done)
            req.prompt_token_ids, req.params = [*base.prompt_token_ids, *self.generated], params
        self.submissions += 1
        self.attempt = Attempt(req.request_id)  # until routed; releasing it releases the routed one (same id)
        attempt = await self.backend.route(req)
        if attempt is None:
            return False
        self.attempt = attempt
        if k:
            log.info("resubmitted", attempt_id=req.request_id, attempt=req.attempt, instances=attempt.instances,
                     continued_after=len(self.generated))  # fmt: skip
        return True

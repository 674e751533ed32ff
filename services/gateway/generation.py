"""Failover ("nothing in flight is lost when a worker dies"). The request goes to the router (backend.py);
its RouteReply names the instances now holding it. The request moves elsewhere when
  - one of those instances leaves the registry (its entry was removed or its heartbeats stopped for
    the TTL), or
  - a worker sends a retriable error chunk (it cannot go on; another instance may), or
  - this gateway's NATS connection came back after a loss: chunks published meanwhile are gone, so
    every request in flight goes on from what reached it,
by resubmitting it (attempt + 1), at most `max_submissions` submissions in all, then a clear 503. A
resubmission the router refuses for now (503 / 429: no instance ready, all full) or does not answer is
tried again with backoff and not counted for `RECOVERY_S` after a reconnection (routers and workers are
reconnecting too), and for `RECOVERY_S` once a stream that already sent output was refused: its client
cannot retry it without losing what it has, and a lost worker's supervisor is starting it again.

Before any output the same request goes again. After output (n == 1) it continues: prompt = prompt
+ the tokens generated so far, max_tokens and min_tokens reduced by their number, so the client's
stream goes on where it stopped. A seeded or penalised request may then differ from an uninterrupted
run: the new worker's sampler starts afresh and sees those tokens as prompt. With n > 1 a caller
that has sent nothing yet (non-streaming) may start over (`on_restart`); otherwise it is a 503.

Every attempt has its own request id, `<id>-r<k>` (the first keeps `<id>`): chunks still in flight
from an old attempt (its worker may only have been slow to heartbeat) land on a reply subject that
nobody reads and are dropped, and the abort sent for the old attempt cannot cancel the new one.
Log lines carry the attempt's id, whose prefix is the client's request id.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import structlog

from services.gateway.backend import RECOVERY_S, Attempt, Backend, Lost
from shared.errors import DECODE_UNREACHABLE, ApiError
from shared.messages import GenerateRequest, SchemaError, StreamChunk

log = structlog.get_logger("xllm.gateway")


class Generation:
    """A request's output across attempts: `next()` returns its chunks in order, failover hidden.
    `finished` once the last chunk was returned; `attempt` is the submission now running."""

    def __init__(
        self,
        backend: Backend,
        req: GenerateRequest,
        first_timeout: float,
        inter_timeout: float,
        on_restart: Callable[[], None] | None = None,
    ):
        self.backend, self.req = backend, req
        self.first_timeout, self.inter_timeout = first_timeout, inter_timeout
        self.on_restart = on_restart
        self.continuable = req.params.get("n", 1) == 1  # one sequence: its output can go on elsewhere
        self.attempt: Attempt | None = None
        self.submissions = 0
        self.generated: list[int] = []  # n == 1: token ids returned so far (a continuation's prompt tail)
        self.produced = False  # output reached the caller
        self.finished = False
        self.patient_until = 0.0  # monotonic time until which refusals are waited out (see _waiting)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        backend: Backend,
        req: GenerateRequest,
        first_timeout: float,
        inter_timeout: float,
        on_restart: Callable[[], None] | None = None,
    ) -> AsyncIterator["Generation"]:
        """Route `req` and yield its Generation. Leaving before the last chunk (client gone, timeout,
        error) aborts the current attempt, so workers free its KV blocks."""
        gen = cls(backend, req, first_timeout, inter_timeout, on_restart)
        try:
            if not await gen._submit():
                await gen._fail_over("the router did not answer", "router_timeout")
            yield gen
        finally:
            if gen.attempt is not None:
                await backend.release(gen.attempt, abort=not gen.finished)

    async def next(self) -> StreamChunk:
        """The next chunk; ApiError 504 when none comes in time, 503 when failover is exhausted."""
        while True:
            if (chunk := self.attempt.early.pop(self.attempt.next_seq, None)) is not None:
                return self._accept(chunk)
            item = await self._get()
            if isinstance(item, Lost):
                if not item.instance_id and self.produced and not self.continuable and self.on_restart is None:
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
                if err.code == DECODE_UNREACHABLE and len(self.attempt.instances) == 2:  # [prefill, decode]
                    self.req.avoid.append(self.attempt.instances[1])  # the router may still list it: say so
            last = await self._fail_over(why, cause)
            if last is not None:
                return self._accept(last)

    async def _get(self) -> Any:
        attempt = self.attempt
        timeout = self.inter_timeout if attempt.started else self.first_timeout
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow the client's cancel
                item = await attempt.queue.get()
        except TimeoutError:
            waiting_for = "output" if self.produced else "first output"
            raise ApiError(
                504, f"no {waiting_for} from the serving backend within {timeout:g} s", "server_error", None, "timeout"
            ) from None
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
            if self.continuable:
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
            self._restart_or_give_up(why)
            max_tokens = self.req.params.get("max_tokens")
            if max_tokens is not None and len(self.generated) >= max_tokens:  # all there but the finish
                finish = {"index": 0, "token_ids": [], "text": "", "finish_reason": "length"}
                return StreamChunk(self.req.request_id, [finish], finished=True)
            try:
                if await self._submit():
                    return None
                why, cause = "the router did not answer", "router_timeout"
            except ApiError as e:  # refused: final, unless it may pass soon
                if e.retriable and self.produced and self.continuable and not self.patient_until:
                    self.patient_until = time.monotonic() + RECOVERY_S
                if not (e.retriable and self._waiting()):
                    raise
                why, cause = e.message, "router_refused"
            if self._waiting():
                await asyncio.sleep(backoff)
                backoff = min(1.0, 2 * backoff)

    def _waiting(self) -> bool:
        """Whether a refused or unanswered resubmission is tried again, uncounted (see the module's doc)."""
        return self.backend.recovering() or time.monotonic() < self.patient_until

    def _restart_or_give_up(self, why: str) -> None:
        """503 when the submissions are spent, or when n > 1 output already went out; a caller that has
        sent nothing yet starts over."""
        retry_after = self.backend.retry_after_s
        if self.submissions >= self.backend.max_submissions and not self._waiting():
            raise ApiError(
                503,
                f"the request failed on {self.submissions} attempts (last: {why}); retry later",
                "server_error",
                None,
                "worker_unavailable",
                retry_after,
            )
        if self.produced and not self.continuable:
            if self.on_restart is None:
                raise ApiError(
                    503,
                    f"the request was interrupted after producing output ({why}); a request "
                    "with n > 1 cannot be continued elsewhere",
                    "server_error",
                    None,
                    "worker_unavailable",
                    retry_after,
                )
            self.on_restart()
            self.produced = False

    async def _submit(self) -> bool:
        """Route the next attempt: False when the router did not answer (ApiError when it refused)."""
        k, base = self.submissions, self.req
        req = replace(
            base,
            request_id=base.request_id if k == 0 else f"{base.request_id}-r{k}",
            attempt=base.attempt + k,
            decode_instance=None,
        )
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
            log.info(
                "resubmitted",
                attempt_id=req.request_id,
                attempt=req.attempt,
                instances=attempt.instances,
                continued_after=len(self.generated),
            )
        return True

"""The gateway's side of the bus: send a request to the router, receive its chunks, abort it.

One wildcard subscription (`<inbox>.*`) receives the chunks of every request of this gateway; each
request's reply subject is `<inbox>.<request_id>`, so sending needs no per-request SUB round trip.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from services.gateway.errors import ApiError
from shared import subjects
from shared.messages import AbortRequest, GenerateRequest, SchemaError, StreamChunk

log = structlog.get_logger("xllm.gateway")


@dataclass
class ReplyStream:
    """The chunks of one request, in arrival order. `finished` once the last chunk was read."""

    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    async def next(self, timeout: float, waiting_for: str = "output") -> StreamChunk:
        """The next chunk; ApiError 504 when none comes within `timeout` seconds."""
        try:
            data = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise ApiError(504, f"no {waiting_for} from the serving backend within {timeout:g} s",
                           "server_error", None, "timeout") from None  # fmt: skip
        try:
            chunk = StreamChunk.decode(data)
        except SchemaError as e:
            raise ApiError(502, f"bad reply from the serving backend: {e}", "server_error") from None
        if chunk.finished:
            self.finished = True
        return chunk


class Backend:
    def __init__(self, nc: Any, retry_after_s: int = 1):
        self.nc = nc
        self.retry_after_s = retry_after_s
        self._inbox = ""
        self._streams: dict[str, asyncio.Queue] = {}
        self._sub: Any = None

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        # Unbounded pending on the subscription: each stream is bounded by its request's max_tokens,
        # and dropping a chunk (slow consumer) would corrupt an answer.
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_chunk, pending_msgs_limit=0,
                                            pending_bytes_limit=0)  # fmt: skip

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    @property
    def active(self) -> int:
        return len(self._streams)

    async def _on_chunk(self, msg: Any) -> None:
        queue = self._streams.get(msg.subject.rpartition(".")[2])
        if queue is not None:  # else: a late chunk of a request already ended
            queue.put_nowait(msg.data)

    @asynccontextmanager
    async def open(self, req: GenerateRequest) -> AsyncIterator[ReplyStream]:
        """Send `req` to the router and yield its reply stream. Leaving before the last chunk
        (client gone, timeout, error) publishes an abort so workers free the request's KV blocks."""
        rid = req.request_id
        req.reply_subject = f"{self._inbox}.{rid}"
        stream = ReplyStream(rid)
        self._streams[rid] = stream.queue
        try:
            try:
                await self.nc.publish(subjects.ROUTER_GENERATE, req.encode())
            except Exception as e:  # connection closed / draining: nothing was sent
                stream.finished = True
                log.warning("publish_failed", error=repr(e))
                raise ApiError(503, "the message bus is unavailable; retry later", "server_error", None,
                               "bus_unavailable", self.retry_after_s) from None  # fmt: skip
            yield stream
        finally:
            del self._streams[rid]
            if not stream.finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        try:
            await self.nc.publish(subjects.ABORT, AbortRequest(request_id).encode())
            log.info("request_aborted", request_id=request_id)
        except Exception as e:
            log.warning("abort_publish_failed", request_id=request_id, error=repr(e))

"""Decode role: take a request over from a prefill worker (its prompt KV and first tokens), then decode
and stream the rest. A whole request sent to it directly (the router's fallback) runs here as on a
colocated worker.
"""

import asyncio

import structlog
from nats.aio.msg import Msg

from services.worker.config import WorkerConfig
from services.worker.kv_transfer import import_kv
from services.worker.worker import Worker
from shared import subjects
from shared.bus import respond
from shared.engine.errors import InvalidRequestError
from shared.engine.kv_handoff import Continuation
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams
from shared.errors import ApiError, aborted, internal, invalid, unavailable
from shared.logging import bind_request
from shared.messages import Ack, GenerateRequest, KvHandoff, SchemaError
from shared.retry import retry

log = structlog.get_logger()


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, config: WorkerConfig):
        super().__init__(config)
        self.copies: dict[str, asyncio.Task] = {}  # KV imports in progress, by request id

    def abort(self, request_id: str) -> None:
        self.remember_abort(request_id)
        if request_id in self.copies:
            # Stop the copy first (its one write into the blocks, on the engine thread, finishes before
            # the cancel lands); its request frees the blocks after.
            self.copies[request_id].cancel()
        else:
            super().abort(request_id)

    async def subscribe_role(self) -> list:
        return [await self.nc.subscribe(subjects.worker_kv(self.instance_id), cb=self.on_handoff)]

    async def on_handoff(self, msg: Msg) -> None:
        try:
            handoff = KvHandoff.decode(msg.data)
            req = GenerateRequest(**handoff.request)
            params = SamplingParams.from_dict(req.params)
            images = [ImageInput.from_wire(part) for part in req.images]  # a recompute after preemption needs them
            self.engine.validate(req.prompt_token_ids, params, images)
        except (SchemaError, TypeError, InvalidRequestError) as e:
            return await respond(msg, Ack("", self.instance_id, False, invalid(str(e)).to_wire()))
        with bind_request(req.request_id):
            self.spawn(self._import(msg, handoff, req, params, images), req.request_id)

    async def _import(
        self, msg: Msg, handoff: KvHandoff, req: GenerateRequest, params: SamplingParams, images: list[ImageInput]
    ) -> None:
        rid = req.request_id
        try:
            blocks = await self._reserve(handoff, req, params, images)
        except _Refused as refused:
            return await respond(msg, Ack(rid, self.instance_id, False, refused.error.to_wire()))
        if rid in self.aborted:  # aborted while the blocks were being reserved
            await self.engine.call(lambda e: e.abort_request(rid))
            return await respond(msg, Ack(rid, self.instance_id, False, aborted().to_wire()))
        copy = await self._copy(msg, handoff, rid, blocks)
        try:
            stats, trailer = copy.result()
        except asyncio.CancelledError:  # aborted
            return await self.engine.call(lambda e: e.abort_request(rid))
        except Exception as e:  # the prefill worker died, a bad stream...: this attempt is over
            await self.engine.call(lambda e_: e_.abort_request(rid))
            log.warning("kv_import_failed", error=f"{type(e).__name__}: {e}")
            return await self.publish_error(req, unavailable(f"KV import failed: {e}"))
        sequences = trailer.get("sequences")
        # Nothing to go on with: it finished on its first token, or failed, on the prefill worker; or
        # the client left just as the copy ended (too late to cancel it).
        if not sequences or rid in self.aborted:
            return await self.engine.call(lambda e: e.abort_request(rid))
        self.kv_bytes.inc(stats.bytes)
        self.kv_seconds.observe(stats.seconds)
        await self._go_on(req, sequences)

    async def _copy(self, msg: Msg, handoff: KvHandoff, rid: str, blocks: list[int]) -> asyncio.Task:
        """Tell the prefill worker the blocks are reserved, and read the KV into them as it is computed;
        returns the copy, done (cancelled when the request was aborted)."""
        copy = self.copies[rid] = asyncio.create_task(
            import_kv(
                handoff.handle, self.engine.kv_layout, len(blocks), self.host, lambda kv: self._write_kv(blocks, kv)
            )
        )
        try:
            await respond(msg, Ack(rid, self.instance_id))
            await asyncio.wait({copy})
        finally:
            self.copies.pop(rid, None)
            copy.cancel()  # when this task itself is cancelled (shutdown)
        return copy

    async def _go_on(self, req: GenerateRequest, sequences: list[dict]) -> None:
        """The prompt's KV is in place: each sequence goes on from its first token, streamed from chunk 1
        (chunk 0 came from the prefill worker)."""
        rid = req.request_id
        stream = self.engine.register_stream(rid)  # from here an abort reaches the engine, after the commit
        try:
            continuations = [Continuation(**c) for c in sequences]
            await self.engine.call(lambda e: e.handoff.commit_import(rid, continuations))
        except (TypeError, InvalidRequestError) as e:  # e.g. a prefill worker on another device type
            self.engine.abort(rid)
            return await self.publish_error(req, internal(f"bad hand-off: {e}"))
        await self.stream_outputs(req, stream, first_seq=1)

    async def _write_kv(self, blocks: list[int], kv) -> None:
        """The imported layers into the reserved blocks, on the engine thread: the event loop's thread never
        touches engine state. The engine drops its reference to `kv` (maybe a view of the exporter's
        segment) before this returns, so the segment can be closed right after."""
        held = [kv]
        del kv
        await self.engine.call(lambda e: e.runner.write_kv(blocks, held.pop()))

    async def _reserve(
        self, handoff: KvHandoff, req: GenerateRequest, params: SamplingParams, images: list[ImageInput]
    ) -> list[int]:
        """Blocks for the prompt's KV, waiting for room (a while) rather than wasting the prefill."""

        async def try_once() -> list[int]:
            if req.request_id in self.aborted:
                raise _Refused(aborted())
            try:
                blocks = await self.engine.call(
                    lambda e: e.handoff.reserve_import(
                        req.request_id, req.prompt_token_ids, params, req.priority, images
                    )
                )
            except InvalidRequestError as e:
                raise _Refused(invalid(e.message, e.param)) from None
            if blocks is None:
                raise _NoRoom
            return blocks

        try:
            return await retry(
                try_once,
                "kv_reserve",
                delay=0.05,
                max_delay=0.05,
                give_up_after=handoff.lease_s * 0.8,
                retry_if=lambda e: isinstance(e, _NoRoom),
            )
        except _NoRoom:
            raise _Refused(unavailable("no KV room on the decode worker")) from None


class _Refused(Exception):
    def __init__(self, error: ApiError):
        self.error = error


class _NoRoom(Exception):
    """Not enough free KV blocks yet."""

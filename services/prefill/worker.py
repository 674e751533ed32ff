"""Prefill role: compute a prompt's KV and first token, hand the rest to the decode worker the router
chose.

The decode worker gets the hand-off (NATS carries only the handle) first: it reserves its blocks and
connects to the data plane (shared memory on one host; TCP across hosts, where each layer's KV streams
as the prompt's last step computes it), and only then does the prompt start here, so a decode worker
without room costs no prefill and the layers always stream (as SGLang's bootstrap queue does). The
first token streams to the gateway at once, as on any worker; then the decode worker learns each
sequence's first token and sampler state and goes on. The blocks are freed once the KV is copied out;
the export lives until the decode worker confirms receipt, or the lease lapses: never a leak. A request
with no decode instance (the router's fallback) runs here whole, as on a colocated worker.
"""

import asyncio
import time
from dataclasses import asdict

import structlog

from services.worker.kv_transfer import KvDataServer, KvExport
from services.worker.shm import SegmentPool
from services.worker.worker import Worker
from shared import subjects
from shared.bus import BusError, request
from shared.engine.llm_engine import RequestOutput
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams
from shared.errors import DECODE_UNREACHABLE, ApiError, unavailable
from shared.messages import Ack, GenerateRequest, KvHandoff

log = structlog.get_logger()

LEASE_S = 30.0  # how long an export waits for the decode worker: to answer, then to take the KV


class PrefillWorker(Worker):
    role = "prefill"

    async def start_data_plane(self) -> None:
        self.segments = SegmentPool()
        self.data_server = KvDataServer()
        await self.data_server.start("0.0.0.0", self.config.data_port)

    async def stop_data_plane(self) -> None:
        await self.data_server.stop()
        self.segments.close()

    def data_plane(self) -> dict:
        return {"host": self.host, "port": self.data_server.port}

    async def run_request(self, req: GenerateRequest, params: SamplingParams, images: list[ImageInput]) -> None:
        if not req.decode_instance:
            return await super().run_request(req, params, images)
        export = KvExport(req.request_id, self.engine.kv_layout, len(req.prompt_token_ids), self.segments)
        self.data_server.exports[req.request_id] = export
        try:
            ack = await self._hand_off(req, export)  # the decode worker has room and reads: prefill now
            if not ack.ok:
                return await self._refused(req, ack)
            if req.request_id not in self.aborted:  # else aborted while the hand-off was being set up
                await self._prefill(req, params, images, export)
        finally:
            export.finish({"error": "the request ended on the prefill worker"})  # unless it had its trailer
            self.data_server.exports.pop(req.request_id, None)
            export.close()

    async def _prefill(
        self, req: GenerateRequest, params: SamplingParams, images: list[ImageInput], export: KvExport
    ) -> None:
        """The prompt here, its first tokens straight to the gateway, the rest (the trailer) to the decode
        worker; then wait until it has taken the KV."""
        stream = self.engine.register_stream(req.request_id)
        await self.engine.call(
            lambda e: e.handoff.add_prefill_request(
                req.request_id, req.prompt_token_ids, params, req.priority, images, export.stream_layer
            )
        )
        last = await self.stream_outputs(req, stream)
        export.finish(await self._trailer(req.request_id, last, export))
        finished_at = time.perf_counter()
        handed_off = last is not None and last.held  # else nothing was left to hand off, or to report
        if not (await _wait(export.reader_gone, LEASE_S) and export.received.is_set()):
            if handed_off:
                await self._refused(req, _failed(req, f"decode worker {req.decode_instance} did not take the KV"))
            return
        self.kv_bytes.inc(export.nbytes)
        self.kv_seconds.observe(time.perf_counter() - finished_at)
        if handed_off:
            self.requests_total.labels("handed_off").inc()

    async def _hand_off(self, req: GenerateRequest, export: KvExport) -> Ack:
        """Tell the decode worker where the KV will be, and wait until it has reserved its blocks and
        connected to the data plane; or say why not."""
        handoff = KvHandoff(req.request_id, asdict(req), export.handle(self.host, self.data_server.port), LEASE_S)
        try:
            ack = await request(self.nc, subjects.worker_kv(req.decode_instance), handoff, Ack, timeout=LEASE_S)
        except BusError as e:
            ack = _failed(req, f"decode worker {req.decode_instance} unreachable: {e}")
        if ack.ok and not await _wait(export.connected, LEASE_S):
            ack = _failed(req, f"decode worker {req.decode_instance} did not connect to the data plane")
        if not ack.ok:
            export.finish({"error": "refused"})  # nobody reads: end the export now
        return ack

    async def _refused(self, req: GenerateRequest, ack: Ack) -> None:
        """The hand-off failed: the gateway hears it (a 503 moves the request to other instances)."""
        log.warning("handoff_failed", decode=req.decode_instance, error=ack.error)
        await self.publish_error(req, ApiError.from_wire(ack.error or unavailable("KV hand-off failed").to_wire()))

    async def _trailer(self, request_id: str, last: RequestOutput | None, export: KvExport) -> dict:
        """What the decode worker learns once the prompt is done (see services.worker.kv_transfer)."""
        if last is None:
            return {"error": "the request was aborted or failed on the prefill worker"}
        if not last.held:
            return {"done": True}  # it finished on its first token
        try:
            continuations = await self.engine.call(lambda e: e.handoff.export_held(request_id, export.write_rest))
        except KeyError:
            return {"error": "the request was aborted on the prefill worker"}
        return {"sequences": [asdict(c) for c in continuations]}


def _failed(req: GenerateRequest, message: str) -> Ack:
    """The decode worker did not take the hand-off: the code tells the gateway to have the router avoid it."""
    return Ack(req.request_id, req.decode_instance, False, unavailable(message, DECODE_UNREACHABLE).to_wire())


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False

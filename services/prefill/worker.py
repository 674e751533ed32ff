"""Prefill role: compute a prompt's KV and first token, hand the rest to the decode worker the router
chose.

The first token streams to the gateway at once, as on any worker. The KV goes through the data plane
(shared memory on one host, TCP across hosts); NATS carries only the handle. The blocks and the
export stay held until the decode worker acks the copy, or the lease lapses: never a leak. A request
with no decode instance (the router's fallback) runs here whole, as on a colocated worker.
"""

import time
from dataclasses import asdict

import structlog

from shared import subjects
from shared.bus import BusError, request
from shared.engine.sampling_params import SamplingParams
from shared.kv_transfer import KvDataServer, KvExport, SegmentPool
from shared.messages import Ack, GenerateRequest, KvHandoff
from shared.worker import Worker

log = structlog.get_logger()

LEASE_S = 30.0  # how long an export waits for the decode worker's ack


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

    async def run_request(self, req: GenerateRequest, params: SamplingParams) -> None:
        if not req.decode_instance:
            return await super().run_request(req, params)
        rid = req.request_id
        stream = self.engine.register_stream(rid)
        await self.engine.call(lambda e: e.add_prefill_request(rid, req.prompt_token_ids, params,
                                                               req.priority))
        # The first tokens go straight to the gateway: time to first token does not wait for the KV.
        last = await self.stream_outputs(req, stream)
        if last is None or not last.held:
            return  # aborted, failed, or finished on its first token
        start = time.perf_counter()
        try:
            export, continuations = await self.engine.call(lambda e: _export_and_release(e, rid, self.segments))
        except KeyError:
            return  # aborted meanwhile
        self.data_server.exports[rid] = export
        handoff = KvHandoff(rid, asdict(req), export.handle(self.host, self.data_server.port),
                            export.num_tokens, [asdict(c) for c in continuations], self.instance_id,
                            LEASE_S)
        ack = None
        try:
            ack = await request(self.nc, subjects.worker_kv(req.decode_instance), handoff, Ack,
                                timeout=LEASE_S)
        except BusError as e:
            ack = Ack(rid, req.decode_instance, False,
                      {"message": f"decode worker {req.decode_instance} unreachable: {e}",
                       "type": "server_error", "code": 503})
        finally:
            self.data_server.exports.pop(rid, None)
            export.close(received=ack is not None and ack.ok)
        self.kv_bytes.labels().inc(export.nbytes)
        self.kv_seconds.labels().observe(time.perf_counter() - start)
        if not ack.ok:
            log.warning("handoff_failed", decode=req.decode_instance, error=ack.error)
            error = ack.error or {}
            await self.publish_error(req, error.get("message", "KV hand-off failed"),
                                     error.get("code", 503), error.get("type", "server_error"))
        else:
            self.requests_total.labels("handed_off").inc()


def _export_and_release(engine, request_id: str, segments: SegmentPool) -> tuple[KvExport, list]:
    """Copy the held KV out (the export holds it now) and free the blocks, even when the copy fails.
    KeyError when the request is no longer held (aborted)."""
    try:
        continuations = engine.continuations(request_id)
        return KvExport(request_id, engine.runner, *engine.held_blocks(request_id), segments), continuations
    finally:
        engine.release_held(request_id)


def main(argv: list[str] | None = None) -> None:
    from shared.config import load_config
    from shared.worker import WorkerConfig, run_worker

    run_worker(PrefillWorker, load_config(WorkerConfig, argv, prog="python -m services.prefill"))

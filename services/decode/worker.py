"""Decode role: take prompt KV handed off by a prefill worker, then decode and stream.

Also serves whole requests sent to it directly, so `--role colocated` (one engine doing both) is
this same worker registered under the colocated role: the baseline disaggregation must beat.
"""

import asyncio
import time

import structlog
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import respond
from shared.engine.errors import InvalidRequestError
from shared.engine.sampling_params import SamplingParams
from shared.kv_transfer import KvTransferError, import_kv
from shared.logging import bind_request
from shared.messages import Ack, GenerateRequest, KvHandoff, SchemaError
from shared.worker import Worker, WorkerConfig, run_worker

log = structlog.get_logger()


class DecodeWorker(Worker):
    role = "decode"

    async def subscribe_role(self) -> list:
        return [await self.nc.subscribe(subjects.worker_kv(self.instance_id), cb=self.on_handoff)]

    async def on_handoff(self, msg: Msg) -> None:
        try:
            handoff = KvHandoff.decode(msg.data)
            req = GenerateRequest(**handoff.request)
            params = SamplingParams.from_dict(req.params)
        except (SchemaError, TypeError, InvalidRequestError) as e:
            return await respond(msg, Ack("", self.instance_id, False, _refusal(str(e), 400)))
        with bind_request(req.request_id):
            self.spawn(self._import(msg, handoff, req, params), req.request_id)

    async def _import(self, msg: Msg, handoff: KvHandoff, req: GenerateRequest,
                      params: SamplingParams) -> None:
        rid = req.request_id
        deadline = time.monotonic() + handoff.lease_s * 0.8
        while True:  # wait for room rather than waste the prefill
            try:
                blocks = await self.engine.call(lambda e: e.reserve_import(
                    rid, req.prompt_token_ids, params, handoff.num_tokens, req.priority))
            except InvalidRequestError as e:
                return await respond(msg, Ack(rid, self.instance_id, False, _refusal(e.message, 400)))
            if blocks is not None:
                break
            if time.monotonic() > deadline:
                return await respond(msg, Ack(rid, self.instance_id, False,
                                              _refusal("no KV room on the decode worker", 503)))
            await asyncio.sleep(0.05)
        try:
            stats = await import_kv(handoff.handle, self.engine.engine.runner, blocks, self.host)
        except (KvTransferError, OSError, asyncio.IncompleteReadError) as e:
            await self.engine.call(lambda e_: e_.abort_request(rid))
            log.warning("kv_import_failed", error=str(e))
            refusal = _refusal(f"KV import failed: {e}", 503)
            return await respond(msg, Ack(rid, self.instance_id, False, refusal))
        self.kv_bytes.labels().inc(stats.bytes)
        self.kv_seconds.labels().observe(stats.seconds)
        stream = self.engine.register_stream(rid)
        await self.engine.call(lambda e: e.commit_import(rid))
        await respond(msg, Ack(rid, self.instance_id))
        await self.stream_outputs(req, stream)


def _refusal(message: str, code: int) -> dict:
    return {"message": message, "type": "server_error" if code >= 500 else "invalid_request_error",
            "code": code}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from shared.config import load_config

    # `--role colocated` is this module's own flag (a plain Worker: prefill and decode in one engine);
    # the rest is the common WorkerConfig.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--role", choices=("decode", "colocated"), default="decode")
    known, rest = pre.parse_known_args(argv)
    config = load_config(WorkerConfig, rest, prog="python -m services.decode [--role decode|colocated]")
    run_worker(Worker if known.role == "colocated" else DecodeWorker, config)

"""An engine worker on the bus: the colocated role, and what the prefill and decode roles build on.

It loads the model, runs the engine on its own thread, heartbeats its load into the registry,
publishes its prefix-cache events, and serves requests forwarded by the router:
  xllm.worker.<id>.generate   GenerateRequest -> Ack, then StreamChunks to the request's reply subject
  xllm.abort                  AbortRequest (broadcast): drop the request if it is here
The worker is the bus's validation boundary: a request is checked here once (400 with the field named),
and the engine trusts what it is given. The prefill and decode roles add the KV hand-off.
"""

import asyncio
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from typing import ClassVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.encoder.transfer import attach_embeddings
from services.worker.async_engine import AsyncEngine, EngineDeadError, EngineLostError, RequestAborted
from services.worker.config import WorkerConfig
from services.worker.kv_events import publish_kv_events
from services.worker.telemetry import heartbeat_counters, watch_engine
from shared import subjects
from shared.bus import ensure_streams, respond
from shared.engine.calibrate import calibrate
from shared.engine.errors import InvalidRequestError
from shared.engine.llm_engine import LLMEngine, RequestOutput
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams
from shared.errors import ApiError, internal, invalid, overloaded, unavailable
from shared.logging import bind_request
from shared.messages import AbortRequest, Ack, GenerateRequest, InstanceInfo, SchemaError, StreamChunk
from shared.metrics import LATENCY_BUCKETS
from shared.registry import Heartbeater, InstanceRegistry
from shared.service import main

log = structlog.get_logger()

ABORTS_KEPT = 10_000  # aborted request ids remembered: a request or hand-off may arrive after its abort
DRAIN_S = 30.0  # at stop, how long requests in flight get to finish


class Worker:
    role: ClassVar[str] = "colocated"

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.host = config.data_host or socket.gethostname()
        self.instance_id = config.instance_id or f"{self.role}-{socket.gethostname()}-{os.getpid()}"
        self.nc: Client | None = None
        self.engine: AsyncEngine | None = None
        self.tasks: set[asyncio.Task] = set()
        self.aborted: OrderedDict[str, None] = OrderedDict()  # the last ABORTS_KEPT aborted request ids
        self.metrics = CollectorRegistry()
        self.requests_total = Counter(
            "xllm_worker_requests_total", "requests by outcome", ["outcome"], registry=self.metrics
        )
        self.kv_bytes = Counter("xllm_kv_transfer_bytes_total", "KV bytes handed off", registry=self.metrics)
        self.kv_seconds = Histogram(
            "xllm_kv_transfer_seconds",
            "KV hand-off: decode, first layer to last; prefill, prompt done to the decode's receipt",
            registry=self.metrics,
            buckets=LATENCY_BUCKETS,
        )
        self._subs: list = []
        self._heartbeater: Heartbeater | None = None
        self._publisher: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.role

    # ---- lifecycle (shared/service.py runs it) ------------------------------------------------
    async def start(self, nc: Client) -> None:
        self.nc = nc
        js = nc.jetstream()
        await ensure_streams(js)
        events: asyncio.Queue = asyncio.Queue()
        self.engine = await self._load_engine(events)
        watch_engine(self.metrics, lambda: self.engine.stats, self.engine.speculative)
        await self.start_data_plane()
        self._publisher = asyncio.create_task(publish_kv_events(js, self.instance_id, events))
        self._subs = [
            await nc.subscribe(subjects.worker_generate(self.instance_id), cb=self.on_generate),
            await nc.subscribe(subjects.ABORT, cb=self.on_abort),
            *await self.subscribe_role(),
        ]
        self._heartbeater = Heartbeater(await InstanceRegistry.open(js), self.info, interval=self.config.heartbeat_s)
        await self._heartbeater.beat()
        self._heartbeater.start()
        log.info("worker_ready", instance=self.instance_id, role=self.role, kv_blocks=self.engine.stats["total_blocks"])

    async def _load_engine(self, events: asyncio.Queue) -> AsyncEngine:
        log.info("loading_model", model=self.config.model, instance=self.instance_id)
        loop = asyncio.get_running_loop()
        engine = await asyncio.to_thread(
            LLMEngine,
            self.config.engine_config(self.role != "prefill"),
            None,
            lambda *event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        if not self.config.cost_profile:  # measure itself, so the router can predict its steps (calibrate.py)
            await asyncio.to_thread(calibrate, engine)
        async_engine = AsyncEngine(engine)
        async_engine.on_lost = self._leave
        await async_engine.start()
        return async_engine

    def _leave(self, error: Exception) -> None:
        """The engine is lost: stop as on SIGTERM (leave the registry first, so the gateway fails the
        requests over); a supervisor (`xllm up`, compose) starts the worker again."""
        log.error("worker_leaving", instance=self.instance_id, error=str(error))
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        """Leave the pool first (no new work), let requests in flight finish, then stop the engine."""
        if self._heartbeater is not None:
            await self._heartbeater.stop(remove=True)
        for sub in self._subs:
            await sub.unsubscribe()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=DRAIN_S)
        for task in [*self.tasks, self._publisher]:
            if task is not None:
                task.cancel()
        await self.stop_data_plane()
        if self.engine is not None:
            await self.engine.stop()

    def info(self) -> InstanceInfo:
        stats = self.engine.stats
        return InstanceInfo(
            instance_id=self.instance_id,
            role=self.role,
            model=self.config.model,
            pid=os.getpid(),
            host=self.host,
            running=stats["running"],
            waiting=stats["waiting"],
            free_blocks=stats["free_blocks"],
            total_blocks=stats["total_blocks"],
            block_size=self.config.block_size,
            data_plane=self.data_plane(),
            counters=heartbeat_counters(stats, self.metrics),
            updated_at=time.time(),
            cost=stats["cost"],
            load={**asdict(stats["load"]), "max_batched_tokens": self.config.max_num_batched_tokens},
        )

    # ---- role hooks (overridden by prefill / decode) --------------------------------------------
    async def start_data_plane(self) -> None: ...

    async def stop_data_plane(self) -> None: ...

    async def subscribe_role(self) -> list:
        return []

    def data_plane(self) -> dict:
        return {}

    # ---- requests -----------------------------------------------------------------------------
    async def on_generate(self, msg: Msg) -> None:
        try:
            req = GenerateRequest.decode(msg.data)
        except SchemaError as e:
            return await respond(msg, Ack("", self.instance_id, False, invalid(str(e)).to_wire()))
        with bind_request(req.request_id):
            try:
                params, images = self.check(req)
            except ApiError as e:
                self.requests_total.labels("invalid" if e.status == 400 else "overloaded").inc()
                return await respond(msg, Ack(req.request_id, self.instance_id, False, e.to_wire()))
            await respond(msg, Ack(req.request_id, self.instance_id))
            self.spawn(self._admit(req, params, images), req.request_id)

    def check(self, req: GenerateRequest) -> tuple[SamplingParams, list[ImageInput]]:
        """The request's sampling parameters and images, once it is known this worker can run it (else
        ApiError)."""
        if self.engine.lost is not None:  # leaving: the router tries another instance at once
            raise unavailable(f"this worker's engine is lost ({self.engine.lost}); it is leaving")
        try:
            params = SamplingParams.from_dict(req.params)
            images = [ImageInput.from_wire(part) for part in req.images]
            self.engine.validate(req.prompt_token_ids, params, images)
        except InvalidRequestError as e:
            raise invalid(e.message, e.param) from None
        if self.engine.num_requests >= self.config.max_num_seqs + self.config.max_queued:
            raise overloaded("worker queue is full")
        return params, images

    async def _admit(self, req: GenerateRequest, params: SamplingParams, images: list[ImageInput]) -> None:
        """Read the embeddings an encoder computed for the request's images (EPD), then run it. An image whose
        embeddings cannot be read is encoded here, from its pixels."""
        await attach_embeddings(images, req.images, self.host, self.engine.hidden_size)
        await self.run_request(req, params, images)

    async def run_request(self, req: GenerateRequest, params: SamplingParams, images: list[ImageInput]) -> None:
        """Colocated: prefill and decode here, streaming to the gateway."""
        stream = self.engine.add_request(req.request_id, req.prompt_token_ids, params, req.priority, images)
        await self.stream_outputs(req, stream)

    async def stream_outputs(
        self, req: GenerateRequest, stream: asyncio.Queue, first_seq: int = 0
    ) -> RequestOutput | None:
        """Publish the request's outputs as StreamChunks numbered from `first_seq`; the last output,
        or None when the request was aborted or failed."""
        out, seq = None, first_seq
        try:
            async for out in self.engine.outputs(req.request_id, stream):
                await self.nc.publish(req.reply_subject, self._chunk(out, seq).encode())
                seq += 1
        except RequestAborted:
            self.requests_total.labels("aborted").inc()
            return None
        except InvalidRequestError as e:  # the engine refused it (a request id already running here)
            self.requests_total.labels("invalid").inc()
            await self.publish_error(req, invalid(e.message, e.param))
            return None
        except EngineLostError:  # no error to the gateway: it fails the request over when we leave
            self.requests_total.labels("lost").inc()
            return None
        except EngineDeadError as e:
            self.requests_total.labels("failed").inc()
            await self.publish_error(req, internal(f"the engine failed: {e}"))
            return None
        if out.finished:
            self.requests_total.labels("finished").inc()
        return out

    def _chunk(self, out: RequestOutput, seq: int) -> StreamChunk:
        return StreamChunk(
            out.request_id,
            [asdict(d) for d in out.outputs],
            out.finished,
            out.prompt_tokens,
            out.cached_tokens,
            self.instance_id,
            seq=seq,
        )

    async def publish_error(self, req: GenerateRequest, error: ApiError) -> None:
        """The request's last chunk: it failed here (a retriable error moves it to another instance)."""
        chunk = StreamChunk(req.request_id, finished=True, instance_id=self.instance_id, error=error.to_wire())
        await self.nc.publish(req.reply_subject, chunk.encode())

    async def on_abort(self, msg: Msg) -> None:
        try:
            request_id = AbortRequest.decode(msg.data).request_id
        except SchemaError:
            return
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.remember_abort(request_id)
        self.engine.abort(request_id)

    def remember_abort(self, request_id: str) -> None:
        # The abort (from the gateway) and the request or hand-off (from the router or the prefill
        # worker) travel different ways: either may come first.
        self.aborted[request_id] = None
        if len(self.aborted) > ABORTS_KEPT:
            self.aborted.popitem(last=False)

    def spawn(self, coro, request_id: str) -> None:
        async def run() -> None:
            with bind_request(request_id):
                try:
                    await coro
                except Exception:
                    log.exception("request_failed")

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def run_worker(worker_cls: type[Worker], argv: Sequence[str] | None, prog: str) -> int:
    """Entry point of a worker service process (`python -m services.<role>`)."""
    return main(worker_cls, WorkerConfig, prog, argv)

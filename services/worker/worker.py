"""An engine worker on the bus: the common part of the colocated, prefill and decode roles.

It loads the model, runs the engine on its own thread, heartbeats its load into the registry,
publishes its prefix-cache events, and serves requests forwarded by the router:
  xllm.worker.<id>.generate   GenerateRequest -> Ack, then StreamChunks to the request's reply subject
  xllm.abort                  AbortRequest (broadcast): drop the request if it is here
The prefill and decode roles add the KV hand-off (services/prefill, services/decode).
"""

import asyncio
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.worker.async_engine import AsyncEngine, EngineDeadError, RequestAborted
from shared import bus, subjects
from shared.bus import BusError, connect, ensure_streams, respond
from shared.config import load_config, opt
from shared.engine.config import EngineConfig
from shared.engine.errors import InvalidRequestError
from shared.engine.llm_engine import LLMEngine, RequestOutput
from shared.engine.sampling_params import SamplingParams
from shared.errors import ApiError, internal, invalid, overloaded
from shared.logging import LOG_LEVELS, bind_request, configure_logging
from shared.messages import (
    AbortRequest,
    Ack,
    GenerateRequest,
    InstanceInfo,
    KvEvent,
    SchemaError,
    StreamChunk,
)
from shared.metrics import Registry, serve_metrics
from shared.registry import Heartbeater, InstanceRegistry
from shared.retry import retry
from shared.signals import stop_on_signals

log = structlog.get_logger()

ABORTS_KEPT = 10_000  # aborted request ids remembered: a request or hand-off may arrive after its abort


@dataclass
class WorkerConfig:
    """An engine worker (colocated, prefill or decode role)."""

    nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    model: str = opt("smollm2", "GGUF file, Hugging Face folder, or a known short name")
    instance_id: str | None = opt(None, "id in the registry (default: <role>-<host>-<pid>)")
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1...)")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16")
    kv_cache_memory: int | None = opt(None, "KV cache bytes (default: a fraction of free memory)", min=1)
    kv_cache_fraction: float = opt(0.1, "fraction of free memory for the KV cache", min=0.001, max=0.95)
    block_size: int = opt(16, "tokens per KV block", min=1)
    max_num_seqs: int = opt(64, "sequences running at once", min=1)
    max_num_batched_tokens: int = opt(2048, "tokens per engine step (chunked prefill budget)", min=16)
    max_model_len: int | None = opt(None, "context length (default: the model's)", min=2)
    enable_prefix_caching: bool = opt(True, "reuse KV of shared prompt prefixes")
    num_threads: int | None = opt(None, "torch threads (default: torch's; set it when workers share cores)",
                                  min=1)
    max_queued: int = opt(256, "requests waiting beyond the running ones before refusing (429)", min=0)
    data_host: str = opt("", "address other workers reach this one's KV data plane at (default: hostname)")
    data_port: int = opt(0, "TCP port of the KV data plane (0: any free port)", min=0, max=65535)
    metrics_port: int | None = opt(None, "serve Prometheus /metrics on this port (0: any)", min=0, max=65535)
    heartbeat_s: float = opt(1.0, "seconds between registry heartbeats", min=0.1)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, device=self.device, dtype=self.dtype,
                            block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
                            kv_cache_fraction=self.kv_cache_fraction, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            max_model_len=self.max_model_len,
                            enable_prefix_caching=self.enable_prefix_caching, num_threads=self.num_threads)


class Worker:
    role = "colocated"

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.host = config.data_host or socket.gethostname()
        self.instance_id = config.instance_id or f"{self.role}-{socket.gethostname()}-{os.getpid()}"
        self.nc: Client | None = None
        self.engine: AsyncEngine | None = None
        self.tasks: set[asyncio.Task] = set()
        self.aborted: OrderedDict[str, None] = OrderedDict()  # the last ABORTS_KEPT aborted request ids
        self.kv_seq = 0
        self.metrics = Registry()
        self.requests_total = self.metrics.counter("xllm_worker_requests_total", "requests by outcome",
                                                   ["outcome"])
        self.kv_bytes = self.metrics.counter("xllm_kv_transfer_bytes_total", "KV bytes handed off")
        self.kv_seconds = self.metrics.histogram(
            "xllm_kv_transfer_seconds",
            "KV hand-off: decode, first layer to last; prefill, prompt done to the decode's receipt")

    # ---- lifecycle ----------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event | None = None, started: asyncio.Event | None = None) -> None:
        stop = stop or stop_on_signals()
        self.nc = await connect(self.config.nats, self.instance_id)
        js = self.nc.jetstream()
        await ensure_streams(js)
        registry = await InstanceRegistry.open(js)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        log.info("loading_model", model=self.config.model, instance=self.instance_id)
        engine = await asyncio.to_thread(
            LLMEngine, self.config.engine_config(), None,
            lambda *event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.engine = AsyncEngine(engine)
        await self.engine.start()
        self._register_metrics()
        await self.start_data_plane()
        publisher = asyncio.create_task(self._publish_kv_events(js, events))
        subs = [await self.nc.subscribe(subjects.worker_generate(self.instance_id), cb=self.on_generate),
                await self.nc.subscribe(subjects.ABORT, cb=self.on_abort)]
        subs += await self.subscribe_role()
        metrics_runner = None
        if self.config.metrics_port is not None:
            metrics_runner = await serve_metrics(self.metrics, "0.0.0.0", self.config.metrics_port)
        heartbeater = Heartbeater(registry, self.info, interval=self.config.heartbeat_s)
        await heartbeater.beat()
        heartbeater.start()
        log.info("worker_ready", instance=self.instance_id, role=self.role,
                 kv_blocks=engine.block_manager.num_blocks)
        if started:
            started.set()
        await stop.wait()
        log.info("worker_stopping", instance=self.instance_id)
        await heartbeater.stop(remove=True)  # leave the pool first: no new work
        for sub in subs:
            await sub.unsubscribe()
        await self._drain(timeout=30)
        publisher.cancel()
        await self.stop_data_plane()
        await self.engine.stop()
        if metrics_runner:
            await metrics_runner.cleanup()
        await self.nc.drain()

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self.tasks:
            task.cancel()

    def info(self) -> InstanceInfo:
        stats = self.engine.engine.stats()
        return InstanceInfo(instance_id=self.instance_id, role=self.role, model=self.config.model,
                            pid=os.getpid(), host=self.host, running=stats["running"],
                            waiting=stats["waiting"], free_blocks=stats["free_blocks"],
                            total_blocks=stats["total_blocks"], block_size=self.config.block_size,
                            data_plane=self.data_plane(), counters=self.counters(stats),
                            updated_at=time.time())

    def counters(self, stats: dict) -> dict[str, float]:
        transfer = self.kv_seconds.labels()
        return {"prefix_queries": stats["prefix_queries"], "prefix_hits": stats["prefix_hits"],
                "preemptions": stats["preemptions"], "kv_transfer_bytes": self.kv_bytes.labels().value,
                "kv_transfer_seconds": transfer.sum}

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
                params = SamplingParams.from_dict(req.params)
                self.engine.engine.validate(req.prompt_token_ids, params)
            except InvalidRequestError as e:
                self.requests_total.labels("invalid").inc()
                return await respond(msg, Ack(req.request_id, self.instance_id, False,
                                              invalid(e.message, e.param).to_wire()))
            if self.engine.num_requests >= self.config.max_num_seqs + self.config.max_queued:
                self.requests_total.labels("overloaded").inc()
                return await respond(msg, Ack(req.request_id, self.instance_id, False,
                                              overloaded("worker queue is full").to_wire()))
            await respond(msg, Ack(req.request_id, self.instance_id))
            self.spawn(self.run_request(req, params), req.request_id)

    async def run_request(self, req: GenerateRequest, params: SamplingParams) -> None:
        """Colocated: prefill and decode here, streaming to the gateway."""
        stream = self.engine.add_request(req.request_id, req.prompt_token_ids, params, req.priority)
        await self.stream_outputs(req, stream)

    async def stream_outputs(self, req: GenerateRequest, stream: asyncio.Queue,
                             first_seq: int = 0) -> RequestOutput | None:
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
        except EngineDeadError as e:
            self.requests_total.labels("failed").inc()
            await self.publish_error(req, internal(f"the engine failed: {e}"))
            return None
        if out.finished:
            self.requests_total.labels("finished").inc()
        return out

    def _chunk(self, out: RequestOutput, seq: int) -> StreamChunk:
        outputs = [asdict(d) for d in out.outputs]  # SeqDelta has SeqOutput's fields, by name
        return StreamChunk(out.request_id, outputs, out.finished, out.prompt_tokens, out.cached_tokens,
                           self.instance_id, seq=seq)

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

    # ---- prefix-cache events ------------------------------------------------------------------
    async def _publish_kv_events(self, js, events: asyncio.Queue) -> None:
        subject = subjects.kv_events(self.instance_id)
        await self._publish_kv(js, subject, KvEvent(self.instance_id, 0, "cleared"))
        while True:
            event, hashes, parent = await events.get()
            await self._publish_kv(js, subject, KvEvent(self.instance_id, 0, event, hashes, parent))

    async def _publish_kv(self, js, subject: str, event: KvEvent) -> None:
        """Publish in order, riding out a NATS outage: a lost event would cost the index this instance's
        entries (it sees the gap). The msg id drops a retry whose first try landed."""
        self.kv_seq += 1
        event.seq = self.kv_seq
        msg_id = f"{self.instance_id}:{event.seq}"
        await retry(lambda: bus.publish(js, subject, event, msg_id=msg_id), "kv_event_publish")

    def _register_metrics(self) -> None:
        stats = self.engine.engine.stats
        for key, help_text in [("running", "sequences running"), ("waiting", "sequences waiting"),
                               ("free_blocks", "free KV blocks"), ("total_blocks", "KV blocks in all"),
                               ("prefix_hits", "prompt blocks found in the prefix cache"),
                               ("prefix_queries", "prompt blocks looked up in the prefix cache"),
                               ("preemptions", "sequences preempted")]:
            gauge = self.metrics.gauge(f"xllm_worker_{key}", help_text)
            gauge.labels().set_function(lambda k=key: stats()[k])


def run_worker(worker_cls: type[Worker], argv: Sequence[str] | None, prog: str) -> int:
    """Entry point of a worker service process."""
    import uvloop

    config = load_config(WorkerConfig, sys.argv[1:] if argv is None else argv, prog=prog)
    configure_logging(worker_cls.role, config.log_level)
    try:
        uvloop.run(worker_cls(config).serve())
    except BusError as e:
        print(f"{worker_cls.role}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0

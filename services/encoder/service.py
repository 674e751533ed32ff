"""The multimodal encoder (the E of EPD): a LLaVA's vision tower and projector as a service of its own.

    xllm.encoder.<id>.encode   EncodeRequest -> EncodeReply: per image, a handle to its embeddings

Images that arrive while a batch runs are encoded together in the next one. The embeddings stay in
shared memory, keyed by the image's content hash (services/encoder/transfer.py): a repeated image is not
encoded again, and the workers read them from there (mapped on this host, over TCP from another). It
heartbeats into the registry as role "encoder", with its queue and measured encode time, which the
router weighs against encoding on the prefill worker itself.
"""

import asyncio
import os
import socket
import time

import numpy as np
import structlog
import torch
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Gauge

from services.encoder.config import EncoderConfig
from services.encoder.transfer import EmbeddingServer, HeldEmbeddings
from shared import subjects
from shared.bus import respond
from shared.engine.loader import load_vision
from shared.engine.multimodal import ImageEncoder, build_image_encoder
from shared.engine.system import default_dtype
from shared.errors import ApiError, internal, invalid
from shared.images import content_hash
from shared.logging import bind_request
from shared.messages import EncodeReply, EncodeRequest, InstanceInfo, SchemaError
from shared.registry import Heartbeater, InstanceRegistry

log = structlog.get_logger()


class EncoderService:
    name = "encoder"

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.host = config.data_host or socket.gethostname()
        self.instance_id = config.instance_id or f"encoder-{socket.gethostname()}-{os.getpid()}"
        self.encoder: ImageEncoder | None = None
        self.held: HeldEmbeddings | None = None
        self.server: EmbeddingServer | None = None
        self.queue: list[tuple[str, np.ndarray]] = []  # (content hash, pixels) waiting for the next batch
        self.pending: dict[str, asyncio.Future] = {}  # content hash -> its handle, while queued or encoding
        self.encoding = 0  # images in the batch now running
        self.cache_hits = 0
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.metrics = CollectorRegistry()
        for key, text in (("images_encoded", "images encoded"), ("image_cache_hits", "images served from cache")):
            Gauge(f"xllm_encoder_{key}", text, registry=self.metrics).set_function(lambda k=key: self.counters()[k])
        self._batcher: asyncio.Task | None = None
        self._heartbeater: Heartbeater | None = None
        self._sub = None

    async def start(self, nc: Client) -> None:
        self.nc = nc
        self.encoder = await asyncio.to_thread(self._load)
        self.held = HeldEmbeddings(self.host, self.config.cache_bytes)
        self.server = EmbeddingServer(self.held)
        self.held.port = await self.server.start("0.0.0.0", self.config.data_port)
        self._batcher = asyncio.create_task(self._encode_batches())
        self._sub = await nc.subscribe(subjects.encoder_encode(self.instance_id), cb=self._on_message)
        self._heartbeater = Heartbeater(
            await InstanceRegistry.open(nc.jetstream()), self.info, interval=self.config.heartbeat_s
        )
        await self._heartbeater.beat()
        self._heartbeater.start()
        log.info("encoder_ready", instance=self.instance_id, tokens_per_image=self.encoder.tokens_per_image)

    def _load(self) -> ImageEncoder:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        device = torch.device(self.config.device)
        dtype = default_dtype(self.config.dtype, device)
        return build_image_encoder(*load_vision(self.config.model, dtype), device, dtype)

    async def stop(self) -> None:
        if self._heartbeater is not None:
            await self._heartbeater.stop(remove=True)
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=30)
        if self._batcher is not None:
            self._batcher.cancel()
        if self.server is not None:
            await self.server.stop()
        if self.held is not None:
            self.held.close()

    def counters(self) -> dict[str, float]:
        stats = self.encoder.stats() if self.encoder else {"images_encoded": 0, "image_encode_seconds": 0.0}
        return {**stats, "image_cache_hits": self.cache_hits, "busy_seconds": stats["image_encode_seconds"]}

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            instance_id=self.instance_id,
            role="encoder",
            model=self.config.model,
            pid=os.getpid(),
            host=self.host,
            running=self.encoding,
            waiting=len(self.queue),
            block_size=0,
            data_plane={"host": self.host, "port": self.held.port if self.held else 0},
            counters=self.counters(),
            updated_at=time.time(),
        )

    # ---- requests -----------------------------------------------------------------------------
    async def _on_message(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time: each request in its own task.
        task = asyncio.create_task(self._handle(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        try:
            req = EncodeRequest.decode(msg.data)
        except SchemaError as e:
            return await respond(msg, EncodeReply("", self.instance_id, error=invalid(str(e)).to_wire()))
        with bind_request(req.request_id):
            try:
                handles = await asyncio.gather(*(self._embed(image) for image in req.images))
                reply = EncodeReply(req.request_id, self.instance_id, list(handles))
            except ApiError as e:
                reply = EncodeReply(req.request_id, self.instance_id, error=e.to_wire())
            except Exception as e:
                log.exception("encode_failed")
                reply = EncodeReply(req.request_id, self.instance_id, error=internal(f"encoder: {e}").to_wire())
            await respond(msg, reply)

    async def _embed(self, image: dict) -> dict:
        """The image's handle: held already, being encoded for another request, or queued for the next batch."""
        image_hash = image.get("hash")
        if not isinstance(image_hash, str):
            raise invalid("an image lacks its content hash", "images")
        if (handle := self.held.handle(image_hash)) is not None:
            self.cache_hits += 1
            return handle
        if image_hash not in self.pending:
            try:
                pixels = np.frombuffer(image["pixels"], dtype=np.uint8).reshape(image["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise invalid(f"malformed image: {e}", "images") from None
            if pixels.shape != self.encoder.pixel_shape:
                raise invalid(f"an image is {pixels.shape}; this model takes {self.encoder.pixel_shape}", "images")
            if content_hash(pixels) != image_hash:  # the cache is keyed by it: a wrong one would poison it
                raise invalid("an image's content hash does not match its pixels", "images")
            self.pending[image_hash] = asyncio.get_running_loop().create_future()
            self.queue.append((image_hash, pixels))
            self.wake.set()
        return await asyncio.shield(self.pending[image_hash])

    async def _encode_batches(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                size = self.config.max_batch_images
                batch, self.queue = self.queue[:size], self.queue[size:]
                self.encoding = len(batch)
                try:
                    embeds = await asyncio.to_thread(self.encoder.run, [pixels for _, pixels in batch])
                    results = [self.held.put(image_hash, rows) for (image_hash, _), rows in zip(batch, embeds)]
                except Exception as e:  # every waiter learns it; the service goes on
                    log.exception("encode_batch_failed", images=len(batch))
                    results = [internal(f"encoding failed: {type(e).__name__}: {e}") for _ in batch]
                finally:
                    self.encoding = 0
                for (image_hash, _), result in zip(batch, results):
                    future = self.pending.pop(image_hash)
                    if isinstance(result, ApiError):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

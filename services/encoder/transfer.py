"""Image embeddings between processes, as KV travels: the encoder keeps each image's embeddings in a
shared-memory segment, a reader on the same host maps it, a reader elsewhere fetches its bytes over TCP;
NATS carries only the handle.

The held segments are the encoder's embedding cache too: least recently used first out, past a byte
budget. A reader that comes too late finds the image gone and gets None: its worker then encodes the image
itself from the pixels it also has, so an evicted entry or a dead encoder costs time, never a request.
"""

import asyncio
import contextlib
import struct
from collections import OrderedDict
from multiprocessing import shared_memory

import numpy as np
import structlog
import torch

from services.worker.shm import DTYPES, attach_if_there, destroy, tensor_view
from shared.engine.multimodal import ImageInput

log = structlog.get_logger()

_LENGTH = struct.Struct("!Q")
MISSING = 2**64 - 1  # the length sent for an image the encoder no longer holds


class HeldEmbeddings:
    """Embeddings by image content hash, each in its own shared-memory segment, LRU within `max_bytes`."""

    def __init__(self, host: str, max_bytes: int):
        self.host, self.max_bytes = host, max_bytes
        self.port = 0  # the EmbeddingServer's, once it listens
        self.held: OrderedDict[str, tuple[shared_memory.SharedMemory, list[int], str]] = OrderedDict()
        self.bytes = 0

    def handle(self, content_hash: str) -> dict | None:
        """Where the image's embeddings are, if held (it becomes the most recently used)."""
        entry = self.held.get(content_hash)
        if entry is None:
            return None
        self.held.move_to_end(content_hash)
        shm, shape, dtype = entry
        place = {"name": shm.name, "host": self.host, "port": self.port}
        return {"hash": content_hash, **place, "shape": shape, "dtype": dtype}

    def put(self, content_hash: str, embeds: torch.Tensor) -> dict:
        """Hold `embeds` ([tokens, hidden]) and return its handle."""
        if content_hash not in self.held:
            data = embeds.detach().to("cpu").contiguous()
            shm = shared_memory.SharedMemory(create=True, size=max(1, data.numel() * data.element_size()))
            dtype = str(data.dtype).removeprefix("torch.")
            tensor_view(shm.buf, tuple(data.shape), dtype).copy_(data)
            self.held[content_hash] = (shm, list(data.shape), dtype)
            self.bytes += shm.size
            while self.bytes > self.max_bytes and len(self.held) > 1:
                self._evict()
        return self.handle(content_hash)

    def payload(self, content_hash: str) -> bytes | None:
        entry = self.held.get(content_hash)
        if entry is None:
            return None
        shm, shape, dtype = entry
        return bytes(shm.buf[: int(np.prod(shape)) * DTYPES[dtype].itemsize])

    def _evict(self) -> None:
        _, (shm, _, _) = self.held.popitem(last=False)
        self.bytes -= shm.size
        destroy(shm)

    def close(self) -> None:
        while self.held:
            self._evict()


class EmbeddingServer:
    """TCP: a reader sends `<content hash>\\n`, gets an 8-byte length and the embeddings' bytes (or MISSING)."""

    def __init__(self, held: HeldEmbeddings):
        self.held = held
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                payload = self.held.payload(line.decode().strip())
                writer.write(_LENGTH.pack(MISSING if payload is None else len(payload)))
                if payload is not None:
                    writer.write(payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_embeddings(handle: dict, local_host: str, timeout_s: float = 10.0) -> torch.Tensor | None:
    """A copy of the embeddings a handle points at: mapped on this host, fetched over TCP from another; None
    when the encoder no longer holds them or cannot be reached (the caller encodes the image itself)."""
    try:
        shape, dtype = tuple(handle["shape"]), handle["dtype"]
        if handle["host"] == local_host and (shm := attach_if_there(handle["name"])) is not None:
            try:
                return tensor_view(shm.buf, shape, dtype).clone()
            finally:
                shm.close()
        async with asyncio.timeout(timeout_s):
            return await _fetch(handle, shape, dtype)
    except (OSError, KeyError, TypeError, ValueError, TimeoutError) as e:
        log.warning("embedding_read_failed", error=f"{type(e).__name__}: {e}", encoder=handle.get("host"))
        return None


async def attach_embeddings(images: list[ImageInput], parts: list[dict], local_host: str, hidden_size: int) -> None:
    """Give each image (ImageInput) whose request part (ImageRef) carries an encoder's handle those embeddings,
    when they can be read and have the right shape; the engine encodes the others itself."""
    for image, part in zip(images, parts):
        if part.get("embedding"):
            embeds = await read_embeddings(part["embedding"], local_host)
            if embeds is not None and tuple(embeds.shape) == (image.length, hidden_size):
                image.embeds = embeds


async def _fetch(handle: dict, shape: tuple, dtype: str) -> torch.Tensor | None:
    reader, writer = await asyncio.open_connection(handle["host"], handle["port"])
    try:
        writer.write(f"{handle['hash']}\n".encode())
        await writer.drain()
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length == MISSING:
            return None
        data = bytearray(await reader.readexactly(length))
        return torch.frombuffer(data, dtype=DTYPES[dtype]).view(shape)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

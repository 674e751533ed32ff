"""The prefill -> decode KV data plane. NATS carries only the handle; the bytes go another way.

One export is [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim], contiguous and layer-major,
in a POSIX shared-memory segment of the prefill worker. The decode worker gets the handle first,
reserves its blocks, and connects to the prefill worker's TCP data server with `<request id> <mode>\n`;
the prefill worker starts the prompt only once that reader is connected (`KvExport.connected`), so a TCP
reader's layers always stream during the step (deciding it at the step's first layer raced with the
connection, and a short prompt's step often won). The server answers with frames
`kind (1 byte) | length (8 bytes) | payload`: one "L" frame per layer once it is written, then one "T".
- Mode "tcp" (another host): the engine copies each layer out right after its forward in the prompt's
  last step (`KvExport.stream_layer`, the engine's kv_sink) and its L frame, carrying the bytes, goes
  at once: the network transfer overlaps the prefill's compute.
- Mode "shm" (this host): the L frames are empty, the reader copies the layers out of the segment
  itself, and the segment is filled after the step (`write_rest`, ~1 ms for 128 tokens): filling it
  during the step cost the time to first token more than reading early saved (docs/performance.md).
The trailer (msgpack) is {"sequences": [...]} (each sequence's first token and sampler state: the
request goes on), {"done": true} (it finished on its first token) or {"error": "..."}; a trailer may
come early, after fewer layers. The reader answers "R" once it has everything: the export is received.

The exporter owns the segment. Once received it goes back to a pool for the next export (a fresh
segment costs a page fault per 4 KiB on first write: more than the copy itself); when the lease lapses
instead, it is unlinked, so a late reader can never see another request's KV.
"""

import asyncio
import contextlib
import math
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from services.worker.shm import DTYPES, SegmentPool, attach_if_there, destroy, tensor_view
from shared.engine.model_runner import KvLayout, ModelRunner

_FRAME = struct.Struct("!cQ")  # kind, payload length


class KvTransferError(RuntimeError):
    pass


@dataclass
class TransferStats:
    bytes: int = 0
    seconds: float = 0.0


class KvExport:
    """A request's prompt KV in a shared-memory segment, written on the engine thread (during the last
    step for a TCP reader, after it for a shared-memory one) and served from the event loop's thread as
    layers become ready. Make it on the event loop."""

    def __init__(self, request_id: str, layout: KvLayout, num_tokens: int, segments: SegmentPool | None = None):
        (layers, block_size, *block), dtype = layout  # the engine's (ModelRunner.kv_layout)
        self.shape = (layers, 2, -(-num_tokens // block_size), block_size, *block)
        self.dtype = str(dtype).removeprefix("torch.")
        self.request_id = request_id
        self.nbytes = math.prod(self.shape) * dtype.itemsize
        self.segments = segments or SegmentPool(max_idle_bytes=0)
        self.shm = self.segments.take(max(1, self.nbytes))
        self._view: torch.Tensor | None = tensor_view(self.shm.buf, self.shape, self.dtype)
        self._lock = threading.Lock()  # a write in progress on the engine thread vs close()
        self.layers_ready = 0  # what readers have been told
        self.layers_written = 0  # a prefix of the layers, on the engine thread
        self.streaming = False  # a TCP reader is connected: stream layers during the step
        self._streaming_step = False  # ... and it was from the step's first layer on
        self.trailer: dict[str, Any] | None = None
        self.connected = asyncio.Event()  # a reader asked for this export
        self.received = asyncio.Event()  # the reader has it all
        self.reader_gone = asyncio.Event()  # the reader hung up, with it all or not
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def stream_layer(self, runner: ModelRunner, layer: int, block_ids: list[int]) -> None:
        """The engine's KV sink, right after a layer's forward in the prompt's last step: for a TCP
        reader (another host), copy the layer out and announce it, so the network transfer overlaps the
        compute. For a shared-memory reader (this host) nothing: `write_rest` copies everything after
        the step, which costs the time to first token less (docs/performance.md)."""
        if layer == 0:
            self._streaming_step = self.streaming
        if self._streaming_step and self._write(runner, layer, block_ids):
            self._loop.call_soon_threadsafe(self.announce, layer + 1)

    def write_rest(self, runner: ModelRunner, block_ids: list[int]) -> None:
        """Engine thread, after the prompt's last step: copy the layers not streamed yet."""
        for layer in range(self.layers_written, self.shape[0]):
            if not self._write(runner, layer, block_ids):
                return

    def _write(self, runner: ModelRunner, layer: int, block_ids: list[int]) -> bool:
        try:
            if len(block_ids) != self.shape[2]:
                raise KvTransferError(f"{len(block_ids)} blocks for an export of {self.shape[2]}")
            with self._lock:
                if self._view is None:
                    return False  # closed: the request was aborted while its last step ran
                runner.read_blocks(block_ids, layer, out=(self._view[layer, 0], self._view[layer, 1]))
        except Exception as e:  # never fail the engine step: the reader gets the error instead
            self._loop.call_soon_threadsafe(self.finish, {"error": f"KV export failed: {e}"})
            return False
        self.layers_written = layer + 1
        return True

    def finish(self, trailer: dict[str, Any]) -> None:
        """The last word to the reader (see the module doc); the first one given counts. Called once
        the prompt is over, so every layer written by then is announced too."""
        if self.trailer is None:
            self.trailer = trailer
            self.layers_ready = max(self.layers_ready, self.layers_written)
            self._notify()

    async def wait_layer(self, layer: int) -> bool:
        """True once `layer` is written; False if the export ended (trailer) without it."""
        while self.layers_ready <= layer:
            if self.trailer is not None:
                return False
            await self._changed.wait()
        return True

    async def wait_trailer(self) -> dict[str, Any]:
        while self.trailer is None:
            await self._changed.wait()
        return self.trailer

    def announce(self, layers_ready: int) -> None:
        self.layers_ready = max(self.layers_ready, layers_ready)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def handle(self, host: str, port: int | None) -> dict:
        """Where a reader finds the export: the segment (this host) and the data server (any host)."""
        return {
            "name": self.shm.name,
            "host": host,
            "port": port,
            "request_id": self.request_id,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    def layer_bytes(self, layer: int) -> bytes:
        size = self.nbytes // self.shape[0]
        return bytes(self.shm.buf[layer * size : (layer + 1) * size])  # a copy: the segment may go

    def close(self) -> None:
        """Done with the export: its segment is reused only if the reader confirmed receipt."""
        with self._lock:  # after this no write can start, and none is running
            self._view = None  # no view may outlive the mapping
        if self.received.is_set():
            self.segments.give_back(self.shm)
        else:
            destroy(self.shm)


class KvDataServer:
    """TCP side of the data plane: serves live exports by request id, layer by layer as they are written."""

    def __init__(self) -> None:
        self.exports: dict[str, KvExport] = {}
        self.server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        export = None
        try:
            request_id, _, mode = (await reader.readline()).decode().strip().partition(" ")
            export = self.exports.get(request_id)
            if export is None:
                return await _send(writer, b"T", msgpack.packb({"error": f"no export of {request_id!r} here"}))
            if mode == "tcp":
                export.streaming = True  # first, then catch up: a layer written meanwhile is not missed
                export.announce(export.layers_written)
            export.connected.set()
            for layer in range(export.shape[0]):
                if not await export.wait_layer(layer):
                    break
                await _send(writer, b"L", export.layer_bytes(layer) if mode == "tcp" else b"")
            await _send(writer, b"T", msgpack.packb(await export.wait_trailer()))
            if await reader.read(1) == b"R":
                export.received.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the reader is gone: the export is not received
        finally:
            writer.close()
            if export is not None:
                export.reader_gone.set()


async def _send(writer: asyncio.StreamWriter, kind: bytes, payload: bytes) -> None:
    writer.write(_FRAME.pack(kind, len(payload)))
    writer.write(payload)
    await writer.drain()


async def import_kv(
    handle: dict, layout: KvLayout, num_blocks: int, local_host: str, write: Callable[[torch.Tensor], Awaitable[None]]
) -> tuple[TransferStats, dict[str, Any]]:
    """Receive an export as its layers are written: from the exporter's shared-memory segment when on the
    same host (and the segment is there), else from the TCP stream into a buffer of this process. Once
    every layer is here, `write(kv)` ([layers, 2, blocks, block_size, kv_heads, head_dim]) puts them into
    the engine's blocks (on the engine thread: this coroutine never touches engine state), and only then
    is receipt confirmed, so the exporter may reuse its segment. `write` is not called when the export
    ends early (the request finished or failed on the prefill worker). Returns the transfer's figures
    (first layer to receipt) and the exporter's trailer."""
    shape, dtype = tuple(handle["shape"]), handle["dtype"]
    (layers, *block), _ = layout  # another dtype is fine: the blocks are written with a cast
    if shape != (layers, 2, num_blocks, *block):
        raise KvTransferError(f"KV layout {shape} does not fit this worker's {num_blocks} blocks of {tuple(block)}")
    if not handle.get("port"):
        raise KvTransferError("the prefill worker offers no data plane")
    shm = attach_if_there(handle["name"]) if handle["host"] == local_host else None
    staging = shm.buf if shm is not None else bytearray(math.prod(shape) * DTYPES[dtype].itemsize)
    stats, writer = TransferStats(), None
    try:
        reader, writer = await asyncio.open_connection(handle["host"], handle["port"])
        writer.write(f"{handle['request_id']} {'shm' if shm else 'tcp'}\n".encode())
        await writer.drain()
        trailer, first = await _receive(reader, staging if shm is None else None, shape, dtype, stats)
        if "sequences" in trailer:
            kv = tensor_view(staging, shape, dtype)
            try:
                await write(kv)
            finally:
                del kv  # no view may outlive the mapping
        writer.write(b"R")
        await writer.drain()
    finally:
        staging = None
        if writer is not None:
            writer.close()
        if shm is not None:
            with contextlib.suppress(BufferError):  # a traceback may still hold a view: GC unmaps it then
                shm.close()
    stats.seconds = time.perf_counter() - first if first else 0.0
    return stats, trailer


async def _receive(
    reader: asyncio.StreamReader, staging: bytearray | None, shape: tuple[int, ...], dtype: str, stats: TransferStats
) -> tuple[dict[str, Any], float | None]:
    """Read L frames up to the trailer, copying TCP payloads into `staging` (None: the layers are in the
    shared segment already). Returns the trailer and when the first layer arrived."""
    layer_nbytes = math.prod(shape[1:]) * DTYPES[dtype].itemsize
    first = None
    for layer in range(shape[0] + 1):
        kind, size = _FRAME.unpack(await reader.readexactly(_FRAME.size))
        payload = await reader.readexactly(size)
        if kind == b"T":
            trailer = _trailer(payload)
            if "error" not in trailer and "done" not in trailer and layer != shape[0]:
                raise KvTransferError(f"the export ended after {layer} of {shape[0]} layers")
            return trailer, first
        if kind != b"L" or layer == shape[0] or (staging is not None and size != layer_nbytes):
            raise KvTransferError(f"unexpected {kind!r} frame of {size} bytes at layer {layer}")
        first = first or time.perf_counter()
        if staging is not None:
            staging[layer * layer_nbytes : (layer + 1) * layer_nbytes] = payload
        stats.bytes += layer_nbytes
    raise AssertionError("unreachable: a frame after the last layer is refused above")


def _trailer(payload: bytes) -> dict[str, Any]:
    try:
        trailer = msgpack.unpackb(payload)
    except Exception as e:
        raise KvTransferError(f"bad trailer: {e}") from e
    if not isinstance(trailer, dict):
        raise KvTransferError(f"bad trailer: {trailer!r}")
    return trailer

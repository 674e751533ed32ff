"""The prefill -> decode KV data plane. NATS carries only the handle; the bytes go another way.

One export is [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim], contiguous, layer-major so a
reader can start on layer 0 before the last layer has arrived.
- Same host: a POSIX shared-memory segment; the decode worker maps it and copies into its own pool.
- Other hosts: the prefill worker's TCP server streams the same bytes, one layer at a time.
The exporter owns the segment. When the decode worker confirms receipt it goes back to a pool for the
next export (a fresh segment costs a page fault per 4 KiB on first write: more than the copy itself);
when the lease lapses instead, it is unlinked, so a late reader can never see another request's KV.
"""

import asyncio
import contextlib
import math
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import torch

from shared.engine.model_runner import ModelRunner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LEN = struct.Struct("!Q")
_CREATED: set[str] = set()  # segments this process created (and so owns)


class KvTransferError(RuntimeError):
    pass


@dataclass
class TransferStats:
    bytes: int = 0
    seconds: float = 0.0


class SegmentPool:
    """Shared-memory segments kept mapped for reuse, in power-of-two sizes, at most `max_idle_bytes` idle.
    Taken on the engine thread, given back on the event loop: hence the lock."""

    def __init__(self, max_idle_bytes: int = 256 << 20):
        self.max_idle_bytes = max_idle_bytes
        self.idle: dict[int, list[shared_memory.SharedMemory]] = {}
        self.idle_bytes = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        size = max(1 << 16, 1 << (nbytes - 1).bit_length())
        with self.lock:
            if self.idle.get(size):
                self.idle_bytes -= size
                return self.idle[size].pop()
        shm = shared_memory.SharedMemory(create=True, size=size)
        _CREATED.add(shm.name)
        return shm

    def give_back(self, shm: shared_memory.SharedMemory) -> None:
        with self.lock:
            if self.idle_bytes + shm.size <= self.max_idle_bytes:
                self.idle.setdefault(shm.size, []).append(shm)
                self.idle_bytes += shm.size
                return
        _destroy(shm)

    def close(self) -> None:
        with self.lock:
            idle, self.idle, self.idle_bytes = self.idle, {}, 0
        for segments in idle.values():
            for shm in segments:
                _destroy(shm)


class KvExport:
    """The KV of some blocks, copied out of the pool into a shared-memory segment."""

    def __init__(self, request_id: str, runner: ModelRunner, block_ids: list[int], num_tokens: int,
                 segments: SegmentPool | None = None):
        cache = runner.k_cache  # [layers, blocks, block_size, kv_heads, head_dim]
        self.shape = (cache.shape[0], 2, len(block_ids), *cache.shape[2:])
        self.dtype = str(cache.dtype).removeprefix("torch.")
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.nbytes = math.prod(self.shape) * cache.element_size()
        self.segments = segments or SegmentPool(max_idle_bytes=0)
        self.shm = self.segments.take(max(1, self.nbytes))
        if block_ids:
            view = _tensor(self.shm.buf, self.shape, self.dtype)
            for layer in range(self.shape[0]):
                runner.read_blocks(block_ids, layer, out=(view[layer, 0], view[layer, 1]))
            del view  # no view may outlive the mapping

    def handle(self, host: str, port: int | None) -> dict:
        return {"transport": "shm", "name": self.shm.name, "host": host, "port": port,
                "request_id": self.request_id, "shape": list(self.shape), "dtype": self.dtype,
                "num_tokens": self.num_tokens}

    def layer_bytes(self, layer: int) -> memoryview:
        size = self.nbytes // self.shape[0]
        return self.shm.buf[layer * size : (layer + 1) * size]

    def close(self, received: bool = False) -> None:
        """Done with the export: its segment is reused only when the decode worker confirmed receipt."""
        if received:
            self.segments.give_back(self.shm)
        else:
            _destroy(self.shm)


class KvDataServer:
    """TCP side of the data plane: serves live exports by request id, layer by layer."""

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
        try:
            request_id = (await reader.readline()).decode().strip()
            export = self.exports.get(request_id)
            if export is None:
                writer.write(_LEN.pack(0))
            else:
                writer.write(_LEN.pack(export.nbytes))
                for layer in range(export.shape[0]):
                    writer.write(export.layer_bytes(layer))
                    await writer.drain()
            await writer.drain()
        finally:
            writer.close()


async def import_kv(handle: dict, runner: ModelRunner, block_ids: list[int],
                    local_host: str) -> TransferStats:
    """Copy an export into `block_ids` of this worker's pool: shared memory when on the same host
    (and the segment is there), else the exporter's TCP stream."""
    start = time.perf_counter()
    shape, dtype = tuple(handle["shape"]), handle["dtype"]
    if shape[2] != len(block_ids) or list(shape[3:]) != list(runner.k_cache.shape[2:]):
        raise KvTransferError(f"KV layout {shape} does not fit this worker's pool "
                              f"{tuple(runner.k_cache.shape)} with {len(block_ids)} blocks")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if not block_ids:
        return TransferStats(0, 0.0)
    if handle["host"] == local_host and _shm_exists(handle["name"]):
        await asyncio.to_thread(_copy_from_shm, handle["name"], shape, dtype, runner, block_ids)
    else:
        await _copy_from_tcp(handle, shape, dtype, nbytes, runner, block_ids)
    return TransferStats(nbytes, time.perf_counter() - start)


def _copy_from_shm(name: str, shape: tuple, dtype: str, runner: ModelRunner, block_ids: list[int]) -> None:
    shm = _attach(name)
    try:
        view = _tensor(shm.buf, shape, dtype)
        for layer in range(shape[0]):
            runner.write_blocks(block_ids, layer, view[layer, 0], view[layer, 1])
        del view
    finally:
        shm.close()


async def _copy_from_tcp(handle: dict, shape: tuple, dtype: str, nbytes: int, runner: ModelRunner,
                         block_ids: list[int]) -> None:
    if not handle.get("port"):
        raise KvTransferError("the prefill worker offers no TCP data plane")
    reader, writer = await asyncio.open_connection(handle["host"], handle["port"])
    try:
        writer.write(f"{handle['request_id']}\n".encode())
        await writer.drain()
        (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if size != nbytes:
            raise KvTransferError(f"export of {handle['request_id']} is gone or has {size} bytes, "
                                  f"not {nbytes}")
        layer_shape = shape[1:]
        for layer in range(shape[0]):
            data = await reader.readexactly(nbytes // shape[0])
            kv = _tensor(bytearray(data), layer_shape, dtype)
            runner.write_blocks(block_ids, layer, kv[0], kv[1])
    finally:
        writer.close()


def _tensor(buffer, shape: tuple, dtype: str) -> torch.Tensor:
    """The first prod(shape) elements of `buffer` (a pooled segment may be larger)."""
    return torch.frombuffer(buffer, dtype=DTYPES[dtype], count=math.prod(shape)).view(shape)


def _destroy(shm: shared_memory.SharedMemory) -> None:
    _CREATED.discard(shm.name)
    shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


def _attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    # Python < 3.13 registers attached segments too, and its tracker would unlink the exporter's
    # segment when this process exits: only the creator owns it.
    if shm.name not in _CREATED:
        resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _shm_exists(name: str) -> bool:
    try:
        _attach(name).close()
        return True
    except FileNotFoundError:
        return False

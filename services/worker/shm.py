"""Shared-memory segments for the KV data plane: a pool of mapped segments, tensors over their bytes,
and attaching to another process's segment without taking ownership of it."""

import contextlib
import math
import threading
from multiprocessing import resource_tracker, shared_memory

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CREATED: set[str] = set()  # segments this process created (and so owns)


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
        destroy(shm)

    def close(self) -> None:
        with self.lock:
            idle, self.idle, self.idle_bytes = self.idle, {}, 0
        for segments in idle.values():
            for shm in segments:
                destroy(shm)


def tensor_view(buffer, shape: tuple, dtype: str) -> torch.Tensor:
    """The first prod(shape) elements of `buffer` (a pooled segment may be larger)."""
    return torch.frombuffer(buffer, dtype=DTYPES[dtype], count=math.prod(shape)).view(shape)


def destroy(shm: shared_memory.SharedMemory) -> None:
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


def attach_if_there(name: str) -> shared_memory.SharedMemory | None:
    try:
        return _attach(name)
    except FileNotFoundError:
        return None

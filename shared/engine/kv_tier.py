"""The second KV tier (`--kv-host-memory`): prefix-cache blocks evicted from the KV pool go down to it instead
of being dropped, and a later prompt (or a preempted sequence coming back) that needs them brings them back up.

On CUDA the tier is pinned host memory. On a CPU-only host the "device" pool is already host RAM, so the tier
is a memory-mapped file on local disk (unlinked at once: nothing is left behind): lossless, so output is the
same as recomputing; the kernel keeps its hot pages in RAM and can write cold ones out to disk, where the pool
is anonymous memory that must stay resident (docs/architecture.md weighs this against an int8 pool).

Swap or recompute, by a performance model (AccUDNN's idea, per block): a block goes down only when moving it
down and back up (the copies measured here) costs less than recomputing it (`recompute_seconds`: the engine's
step-cost model, for a block's tokens at its position in the sequence).

Blocks are keyed as the prefix cache keys them (chained hashes, with the tokens to check collisions). The
tier is inclusive: a block brought back up keeps its copy down here, so evicting it again costs nothing.
"""

import os
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import torch

EMA = 0.1  # weight of the latest copy in the measured seconds per block


class HostKvTier:
    def __init__(
        self,
        num_blocks: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        recompute_seconds: Callable[[int], float | None] = lambda start: None,
        directory: str | None = None,
    ):
        if num_blocks < 1:
            raise ValueError("the host KV tier needs room for at least one block")
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, blocks, block_size, kv_heads, head_dim]
        layers, _, block_size, heads, dim = k_cache.shape
        shape = (num_blocks, 2, layers, block_size, heads, dim)
        self.data = _host_tensor(shape, k_cache.dtype, k_cache.device, directory)
        self.block_size = block_size
        self.recompute_seconds = recompute_seconds  # of a block starting at a token position (None: unknown)
        self.index: OrderedDict[int, int] = OrderedDict()  # block hash -> host slot, least recently used first
        self.token_ids: dict[int, list[int]] = {}  # host slot -> the block's tokens (collision check)
        self.free_slots: deque[int] = deque(range(num_blocks))
        self.claimed: list[int] = []  # blocks an admission in progress brings up (`claim`)
        self.swapped_out = self.swapped_in = self.recomputed = 0  # blocks
        self.out_seconds = self.in_seconds = 0.0  # spent copying
        self.out_per_block, self.in_per_block = self._measure()

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    def holds(self, block_hash: int) -> bool:
        return block_hash in self.index

    def claim(self, block_hashes: list[int]) -> None:
        """The blocks a prompt is about to bring up, the first most needed: the most recently used, kept from
        being dropped (by what goes down to make room for them) until `release`."""
        self.claimed = [h for h in reversed(block_hashes) if h in self.index]
        for h in self.claimed:
            self.index.move_to_end(h)

    def release(self) -> None:
        self.claimed = []

    def worth_keeping(self, start: int) -> bool:
        """Whether a block of tokens [start, start + block_size) costs less to move down and up than to recompute."""
        recompute = self.recompute_seconds(start)
        if recompute is None:  # no cost model yet: keep it (the cheaper side on every machine measured so far)
            return True
        keep = self.out_per_block + self.in_per_block < recompute
        self.recomputed += not keep
        return keep

    def store(self, block_id: int, block_hash: int, token_ids: list[int]) -> list[int] | None:
        """Copy a device block down; returns the hashes dropped from the tier to make room (least recently used),
        or None when there is none to drop but claimed ones (the block is not stored)."""
        dropped = []
        if not self.free_slots:
            if next(iter(self.index)) in self.claimed:
                return None
            old_hash, slot = self.index.popitem(last=False)
            del self.token_ids[slot]
            self.free_slots.append(slot)
            dropped.append(old_hash)
        slot = self.free_slots.popleft()
        started = time.perf_counter()
        self.data[slot, 0] = self.k_cache[:, block_id]
        self.data[slot, 1] = self.v_cache[:, block_id]
        seconds = time.perf_counter() - started
        self.out_seconds += seconds
        self.out_per_block += EMA * (seconds - self.out_per_block)
        self.index[block_hash], self.token_ids[slot] = slot, token_ids
        self.swapped_out += 1
        return dropped

    def load(self, block_hash: int, token_ids: list[int], block_id: int) -> bool:
        """Copy the tier's block of this hash (and these tokens) up into a device block; False if it is not here."""
        slot = self.index.get(block_hash)
        if slot is None or self.token_ids[slot] != token_ids:
            return False
        self.index.move_to_end(block_hash)
        started = time.perf_counter()
        self.k_cache[:, block_id] = self.data[slot, 0].to(self.k_cache.device, non_blocking=True)
        self.v_cache[:, block_id] = self.data[slot, 1].to(self.v_cache.device, non_blocking=True)
        seconds = time.perf_counter() - started
        self.in_seconds += seconds
        self.in_per_block += EMA * (seconds - self.in_per_block)
        self.swapped_in += 1
        return True

    def stats(self) -> dict:
        return {
            "kv_host_blocks": self.num_blocks,
            "kv_host_used_blocks": len(self.index),
            "kv_swapped_out_blocks": self.swapped_out,
            "kv_swapped_in_blocks": self.swapped_in,
            "kv_recomputed_blocks": self.recomputed,
            "kv_swap_out_seconds": self.out_seconds,
            "kv_swap_in_seconds": self.in_seconds,
            "kv_swap_seconds_per_block": self.out_per_block + self.in_per_block,
            "kv_fetch_seconds_per_block": self.in_per_block,
        }

    def _measure(self, rounds: int = 3) -> tuple[float, float]:
        """Seconds to copy one block down and one up (the fastest of a few rounds, slot 0 and block 0 as scratch:
        both are overwritten before they are read)."""
        down = up = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            self.data[0, 0] = self.k_cache[:, 0]
            self.data[0, 1] = self.v_cache[:, 0]
            _synchronize(self.data.device, self.k_cache.device)
            middle = time.perf_counter()
            self.k_cache[:, 0] = self.data[0, 0].to(self.k_cache.device)
            self.v_cache[:, 0] = self.data[0, 1].to(self.v_cache.device)
            _synchronize(self.data.device, self.k_cache.device)
            down, up = min(down, middle - started), min(up, time.perf_counter() - middle)
        return down, up


def _host_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, directory: str | None):
    if device.type == "cuda":
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    fd, path = tempfile.mkstemp(prefix="xllm-kv-", dir=directory)
    try:
        # The disk space is reserved now, not page by page as blocks are first written: a full disk is an error
        # here rather than a SIGBUS in the middle of a step.
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise OSError(e.errno, f"--kv-host-memory: cannot reserve {nbytes} bytes in {path}: {e.strerror}") from e
        data = torch.from_file(path, shared=True, size=numel, dtype=dtype)  # the mapping outlives the name
    finally:
        os.close(fd)
        os.unlink(path)
    return data.view(shape)


def _synchronize(*devices: torch.device) -> None:
    if any(d.type == "cuda" for d in devices):
        torch.cuda.synchronize()


def host_tier(config, runner, costs) -> HostKvTier | None:
    """The tier an EngineConfig's `kv_host_memory` asks for beside a ModelRunner's pool, its blocks priced against
    recomputing them by the engine's step costs (a StepCosts); None without one."""
    if not config.kv_host_memory:
        return None
    if not config.enable_prefix_caching:
        raise ValueError("--kv-host-memory needs prefix caching: blocks are found in the tier by their prefix hashes")
    k_cache, v_cache = runner.k_cache, runner.v_cache
    layers, _, block_size, heads, dim = k_cache.shape
    block_bytes = 2 * layers * block_size * heads * dim * k_cache.element_size()

    def recompute_seconds(start: int) -> float | None:
        return costs.model and costs.model.prefill_work(block_size, start)

    return HostKvTier(config.kv_host_memory // block_bytes, k_cache, v_cache, recompute_seconds, config.kv_host_path)

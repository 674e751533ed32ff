"""What the machine gives the engine: the default dtype of a device and the KV cache budget."""

from pathlib import Path

import torch

from shared.engine.config import EngineConfig

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def default_dtype(name: str, device: torch.device) -> torch.dtype:
    # fp32 on CPU: without native bf16 a bf16 matmul here ran ~300x slower than fp32.
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    available = 4 << 30
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return min(available, _cgroup_room())


def _cgroup_room() -> int:
    """Room left under a container's memory limit (cgroup v2); /proc/meminfo shows the host's."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return 1 << 62
    return 1 << 62 if limit == "max" else max(0, int(limit) - used)


def kv_cache_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory:
        if config.kv_cache_memory > available_memory(device):
            raise ValueError(
                f"kv_cache_memory {config.kv_cache_memory >> 20} MiB is more than the "
                f"{available_memory(device) >> 20} MiB available"
            )
        return config.kv_cache_memory
    return int(available_memory(device) * config.kv_cache_fraction)

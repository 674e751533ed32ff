"""The engine's C++ CPU kernels (csrc/cpu_kernels.cpp, and csrc/quant_kernels.cpp for weights kept in GGUF's
block formats), compiled on first use for this machine's CPU.

torch's JIT extension builder caches the build (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) and
locks it, so worker processes starting together build it once. Without a C++ compiler, or with
XLLM_CPU_KERNELS=0, the engine uses plain torch ops instead: same results, slower. `make` builds it at
setup (`python -m shared.engine.cpu_kernels`) so that no server start waits for the compiler.
"""

import hashlib
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from shared.logging import get_logger

log = get_logger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
QUANT_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("quant_kernels.cpp", "quant_dequantize.cpp")]


@cache
def load() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or is switched off."""
    return _build("xllm_cpu_kernels", [SOURCE], fast_math=True)


@cache
def load_quant() -> ModuleType | None:
    """The block-format matmul kernels (csrc/quant_*.cpp), or None as for `load`. Without -ffast-math: a row's
    bits must not depend on how the compiler reassociated each tile shape's code."""
    return _build("xllm_quant_kernels", QUANT_SOURCES, fast_math=False)


def _build(name: str, sources: list[Path], fast_math: bool) -> ModuleType | None:
    if os.environ.get("XLLM_CPU_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load as load_extension

    # -march=native: the build is for the CPU it runs on; the name keeps builds for different CPUs apart.
    # torch rebuilds when the sources or flags change, not the headers: their hash goes in as a flag.
    capability = torch.backends.cpu.get_cpu_capability().lower()
    headers = hashlib.sha1(b"".join(path.read_bytes() for path in sorted(SOURCE.parent.glob("*.h")))).hexdigest()
    flags = ["-O3", "-march=native", "-fopenmp", f"-DXLLM_HEADERS={headers[:12]}"]
    try:
        return load_extension(
            f"{name}_{capability}",
            [str(source) for source in sources],
            extra_cflags=flags + (["-ffast-math"] if fast_math else []),
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, or a failed build: fall back, loudly
        log.warning("cpu_kernels_unavailable", error=str(exc).splitlines()[-1] if str(exc) else repr(exc))
        return None


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernels apply to this tensor's device and dtype (and could be built)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and load() is not None


if __name__ == "__main__":
    sys.exit(0 if load() is not None and load_quant() is not None else f"could not build {SOURCE} or {QUANT_SOURCES}")

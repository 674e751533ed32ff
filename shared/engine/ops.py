"""The model's projection and per-layer small ops, each in one place: the C++ kernel (cpu_kernels) for fp32
on CPU, torch ops elsewhere (CUDA, other dtypes, or no compiler). Both compute the same thing, to float
rounding; tests/engine/test_cpu_kernels.py holds them to it.
"""

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from shared.engine import cpu_kernels
from shared.engine.quant import KERNEL_FORMATS, QuantizedWeight

# oneDNN keeps a compiled primitive for every matmul shape it has run, 1024 by default. Prefill steps come
# in every token count, so that cache grew a prefill worker by ~0.8 GB in a 10-minute soak; 64 keeps its
# memory flat at no measured cost in speed (docs/performance.md). Read at oneDNN's first matmul.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

# Up to this many rows the kernel (each weight row read once for all rows) is the fastest form here; above
# it oneDNN's matmul on a prepacked weight (benchmarks/matmul_forms.py).
SMALL_BATCH_ROWS = 8

# A block-format weight runs a step's generated tokens in the integer kernel and, where its prepacked fp32 copy is
# kept (CausalLM.prepack_weights), its prompt tokens on that copy. Each form gives a row the same bits however
# many rows share its step, and the kernel's activation rounding (to Q8 blocks) would turn any other difference
# into a different greedy token, so the choice goes by the kind of token, never by the step's size. Prompt rows
# could run in the kernel too (no slower than fp32 at any row count here, docs/performance.md §12, and without
# the copy's memory), but a prompt's chunked attention is not known to give the same bits however the prompt is
# chunked, and the kernel's rounding would amplify any difference. Outside a model runner's step, and for a
# weight with no fp32 copy (a model too large to keep one), every row runs in the kernel.
_step = threading.local()  # .prompt: which rows of the running step are prompt tokens


@contextmanager
def prompt_rows(is_prompt: list[bool]) -> Iterator[None]:
    """Within: row i of every matmul is a prompt token iff is_prompt[i] (the rest are generated tokens)."""
    before = getattr(_step, "prompt", None)
    if all(is_prompt) or not any(is_prompt):
        _step.prompt = all(is_prompt)
    else:
        mask = torch.tensor(is_prompt)
        _step.prompt = (mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1))
    try:
        yield
    finally:
        _step.prompt = before


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias; `packed` is the weight prepacked for oneDNN (prepack_weight), when kept."""
    if not cpu_kernels.usable(x):
        return F.linear(x, weight, bias)
    if x.shape[0] <= SMALL_BATCH_ROWS:
        y = cpu_kernels.load().linear_small_batch(x.contiguous(), weight)
        return y if bias is None else y + bias
    if packed is not None:
        return _packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias for a weight in a block format (only where quant.kernels_run); `packed`: its fp32
    copy prepacked for oneDNN, when kept."""
    prompt = getattr(_step, "prompt", None) if packed is not None else None
    if isinstance(prompt, tuple):  # both kinds in one step: each its own way
        prompt_index, generated_index = prompt
        y = x.new_empty(x.shape[0], weight.shape[0])
        y[prompt_index] = _packed_linear(x[prompt_index], packed)
        y[generated_index] = _kernel_linear(x[generated_index], weight)
    else:
        y = _packed_linear(x, packed) if prompt else _kernel_linear(x, weight)
    return y if bias is None else y + bias


def _kernel_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    return cpu_kernels.load_quant().quantized_linear(x.contiguous(), weight.data, KERNEL_FORMATS[weight.format])


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # the op torch's own CPU compiler (inductor) emits for a prepacked linear: the same bits for a row whatever
    # the number of rows (checked for 1-255 rows, 1 and 2 threads)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout (a second copy), where oneDNN runs: fp32 on CPU."""
    if not (cpu_kernels.usable(weight) and torch.backends.mkldnn.is_available()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # packed for ~32-row steps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if cpu_kernels.usable(x):
        return cpu_kernels.load().rms_norm(x.contiguous(), weight, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place), then returns rms_norm(residual)."""
    if cpu_kernels.usable(x):
        return cpu_kernels.load().add_rms_norm_(x.contiguous(), residual, weight, eps)
    residual.add_(x)
    return rms_norm(residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2n] laid out as [gate | up] -> silu(gate) * up, [T, n]."""
    if cpu_kernels.usable(gate_up):
        return cpu_kernels.load().silu_and_mul(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, heads, D] and k [T, kv_heads, D] by each token's cos/sin [T, D/2] (HF's rotate_half
    layout) and writes k and v into the caches at slot_mapping. Returns the rotated q and k."""
    if cpu_kernels.usable(q) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        cpu_kernels.load().rotary_and_cache(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
        return q, k
    qk = _rotate(torch.cat((q, k), dim=1), cos.unsqueeze(1), sin.unsqueeze(1))  # one pass for q and k
    q, k = qk[:, : q.shape[1]], qk[:, q.shape[1] :]
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
    return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

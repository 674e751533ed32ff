"""The building blocks every model shares, named as in the Hugging Face checkpoints: linear layers (one
packed matmul for projections of the same input), RMSNorm and the SwiGLU MLP."""

import torch
from torch import nn

from shared.engine import ops
from shared.engine.quant import QuantizedWeight

# checkpoint module name -> (our packed module, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Linear(nn.Linear):
    packed: torch.Tensor | None = None  # the weight prepacked for oneDNN (CausalLM.prepack_weights)
    quantized: QuantizedWeight | None = None  # the weight in a block format, in place of `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return ops.quantized_linear(x, self.quantized, self.bias, self.packed)
        return ops.linear(x, self.weight, self.bias, self.packed)


class Embedding(nn.Embedding):
    quantized: QuantizedWeight | None = None  # the table in a block format (rows dequantized as looked up)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) if self.quantized is None else self.quantized.rows(input_ids)


def keep_quantized(module: Linear | Embedding, weight: QuantizedWeight) -> None:
    """Run `module` on `weight`'s blocks from now on; its fp parameter's memory is given back."""
    if weight.shape != tuple(module.weight.shape):
        raise ValueError(f"a {weight.shape} weight for {type(module).__name__} {tuple(module.weight.shape)}")
    module.quantized = weight
    module.weight = nn.Parameter(torch.empty(0), requires_grad=False)


class PackedLinear(Linear):
    """Several projections of the same input in one weight, split along the output dimension."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes

    def shard(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.shard_sizes[:index])
        return tensor.narrow(0, start, self.shard_sizes[index])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x), or with `residual`: residual += x in place, then rms_norm(residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm_(x, residual, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden_size, [intermediate_size] * 2, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))

"""Weights kept in GGUF's block formats (Q8_0, Q4_0, Q4_1: 32 weights per block with fp16 scales; the K-quants
Q4_K, Q5_K and Q6_K: 256 per super-block, with 6- or 8-bit scales per 32 or 16), as a GGUF file stores them or quantized
at load (`--quantization`, not into K-quants), and run by the integer kernels in csrc/quant_kernels.cpp. A decode
step then reads ~4.5 bits a weight (Q4) instead of 32.

Quantizing and the reference dequantization are the `gguf` package's (the same arithmetic as ggml's C
reference), so a weight quantized here is byte-for-byte what llama.cpp's tools would write.
"""

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_from_byte_shape, quantize

from shared.engine import cpu_kernels
from shared.engine.config import QUANTIZATIONS

BLOCK = 32  # weights per block
GGML_TYPES = {
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q4_k": GGMLQuantizationType.Q4_K,
    "q5_k": GGMLQuantizationType.Q5_K,
    "q6_k": GGMLQuantizationType.Q6_K,
}
KERNEL_FORMATS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3, "q6_k": 4, "q5_k": 5}  # the C++ kernels' format codes


@dataclass
class QuantizedWeight:
    """A 2-D weight [out, in] as rows of blocks: `data` is uint8 [out, in / 32 * block bytes]."""

    format: str  # a key of GGML_TYPES
    data: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype`."""
        kernels = cpu_kernels.load_quant()
        if kernels is None:
            values = dequantize(self.data.numpy(), GGML_TYPES[self.format])
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)
        weight = torch.empty(self.shape)
        kernels.dequantize_into(self.data, KERNEL_FORMATS[self.format], weight)
        return weight.to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (any shape) dequantized to fp32: [*index.shape, in] (an embedding lookup)."""
        kernels = cpu_kernels.load_quant()
        if kernels is None:
            return self.dequantize()[index]
        rows = kernels.dequantize_rows(self.data, KERNEL_FORMATS[self.format], self.in_features, index.reshape(-1))
        return rows.reshape(*index.shape, self.in_features)

    def with_data(self, data: torch.Tensor) -> "QuantizedWeight":
        """The same format over other rows (a permutation or a concatenation of this one's)."""
        return QuantizedWeight(self.format, data.contiguous(), self.in_features)


def quantize_weight(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """fp weight [out, in] -> its blocks (Q8_0, Q4_0, Q4_1); `in` must be a multiple of 32."""
    blocks = quantize(weight.detach().float().cpu().numpy(), GGML_TYPES[format])
    return QuantizedWeight(format, torch.from_numpy(blocks), weight.shape[1])


def from_gguf(data: np.ndarray, ggml_type: GGMLQuantizationType) -> QuantizedWeight | None:
    """A GGUF tensor's bytes ([out, row bytes]), kept as they are when the kernels run its format; None otherwise."""
    format = next((name for name, t in GGML_TYPES.items() if t == ggml_type), None)
    if format is None or data.ndim != 2:
        return None
    in_features = quant_shape_from_byte_shape(data.shape, ggml_type)[-1]
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: data is a mmap
    return QuantizedWeight(format, blocks, in_features)


def kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether block-format weights can be run here: the CPU kernels, fp32 activations."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_kernels.load_quant() is not None


def plan(quantization: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str | None]:
    """--quantization here -> (keep a GGUF's blocks, the block format to quantize fp projections into)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    if quantization == "none" or (quantization == "auto" and not kernels_run(device, dtype)):
        return False, None
    if not kernels_run(device, dtype):
        raise ValueError(
            f"--quantization {quantization} runs on the CPU kernels with fp32 activations, not on {device} "
            f"in {dtype} (or the kernels did not build): use --quantization none"
        )
    return quantization == "auto", None if quantization == "auto" else quantization

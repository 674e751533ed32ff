"""GGUF checkpoints (llama.cpp's format): tensors -> torch tensors under Hugging Face names; the config
and tokenizer come from the file's metadata (shared/model_files.py).

Every tensor type the `gguf` package dequantizes is readable (Q4_0, Q4_1, Q8_0, K-quants, F16, BF16,
F32...). Tensors are dequantized one at a time, so peak memory stays near the size of the result; with
`keep_blocks`, a 2-D tensor in a format the engine's kernels run (shared/engine/quant.py) stays in it.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from shared.engine.config import ModelConfig
from shared.engine.quant import QuantizedWeight, from_gguf
from shared.model_files import config_from_gguf
from shared.tokenizer import Tokenizer

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# every expert's weights in one [E, out, in] tensor -> one checkpoint tensor per expert
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, keep_blocks: bool = False
) -> tuple[ModelConfig, dict, Tokenizer]:
    reader = GGUFReader(path)
    tokenizer = Tokenizer.from_gguf(reader)
    config = config_from_gguf(reader, tokenizer, Path(path).stem)
    return config, load_weights(reader, config, dtype, keep_blocks), tokenizer


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a tensor we do not use
    (rope_freqs is read into the config instead)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def expert_names(tensor: ReaderTensor) -> list[str]:
    """'blk.3.ffn_up_exps.weight' -> ['model.layers.3.mlp.experts.0.up_proj.weight', ...], one per expert
    (the slowest GGUF dimension); [] for any other tensor."""
    parts = tensor.name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _EXPERT_NAMES:
        return []
    experts = int(tensor.shape[-1])
    return [f"model.layers.{parts[1]}.mlp.experts.{e}.{_EXPERT_NAMES[parts[2]]}.{parts[3]}" for e in range(experts)]


def read_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """Dequantized to float32, in torch's dimension order (GGUF lists dimensions fastest-first)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy: data is a mmap


def load_weights(
    reader: GGUFReader, config: ModelConfig, dtype: torch.dtype, keep_blocks: bool = False
) -> dict[str, torch.Tensor | QuantizedWeight]:
    weights = {}
    llama = config.architecture in ("llama", "mixtral")
    for tensor in reader.tensors:
        if experts := expert_names(tensor):
            for name, w in zip(experts, read_tensor(tensor).unbind(0), strict=True):
                weights[name] = w.to(dtype)
            continue
        name = hf_name(tensor.name)
        if name is None:
            continue
        if keep_blocks and (blocks := from_gguf(tensor.data, tensor.tensor_type)) is not None:
            weights[name] = blocks.with_data(unpermute_rows(blocks.data, name, config)) if llama else blocks
            continue
        w = read_tensor(tensor)
        if name.endswith("shared_expert_gate.weight"):  # llama.cpp keeps it as a vector
            w = w.reshape(1, -1)
        weights[name] = (unpermute_rows(w, name, config) if llama else w).to(dtype)
    return weights


def unpermute_rows(w: torch.Tensor, name: str, config: ModelConfig) -> torch.Tensor:
    """llama.cpp's converter reorders llama Q/K rows for its interleaved rotary; undo it to get HF's
    rotate-half layout back (rows only, so blocks along the input dimension move whole). Qwen files are
    written without the reordering."""
    if ".self_attn.q_proj." in name:
        return unpermute_qk(w, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_qk(w, config.num_key_value_heads)
    return w


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs, 2) -> (2, pairs). Works for biases too."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

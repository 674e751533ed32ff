"""GGUF checkpoints (llama.cpp's format): metadata -> ModelConfig, tensors -> torch tensors under
Hugging Face names, tokenizer from the vocab the file carries.

Every tensor type the `gguf` package dequantizes is readable (Q4_0, Q4_1, Q8_0, K-quants, F16, BF16,
F32...). Tensors are dequantized one at a time, so peak memory stays near the size of the result.
"""

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from shared.engine.config import ModelConfig
from shared.engine.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3")

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
}


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict, Tokenizer]:
    reader = GGUFReader(path)
    tokenizer = Tokenizer.from_gguf(reader)
    config = config_from_gguf(reader, tokenizer, Path(path).stem)
    return config, load_weights(reader, config, dtype), tokenizer


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


def read_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """Dequantized to float32, in torch's dimension order (GGUF lists dimensions fastest-first)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy: data is a mmap


def load_weights(reader: GGUFReader, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        w = read_tensor(tensor)
        # llama.cpp's converter reorders llama Q/K rows for its interleaved rotary; undo it to get HF's
        # rotate-half layout back. Qwen files are written without the reordering.
        if config.architecture == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, config.num_attention_heads)
        elif config.architecture == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, config.num_key_value_heads)
        weights[name] = w.to(dtype)
    return weights


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs, 2) -> (2, pairs). Works for biases too."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(reader: GGUFReader, tokenizer: Tokenizer, name: str = "model") -> ModelConfig:
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")

    def a(key: str, default=None):
        return _meta(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    heads, hidden = a("attention.head_count"), a("embedding_length")
    head_dim = a("attention.key_length") or hidden // heads
    theta = float(a("rope.freq_base", 10000.0))
    return ModelConfig(
        architecture=arch,
        vocab_size=a("vocab_size") or int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        num_hidden_layers=a("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=a("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=a("context_length"),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(a, tensors.get("rope_freqs.weight"), head_dim, theta),
        tie_word_embeddings="output.weight" not in tensors,  # llama.cpp writes output only when untied
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=list(tokenizer.eos_token_ids),
        name=_meta(reader, "general.name", name),
    )


def _rope_scaling(a, rope_freqs: ReaderTensor | None, head_dim: int, theta: float) -> dict | None:
    kind = a("rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": float(a("rope.scaling.factor")),
                "original_max_position_embeddings": a("rope.scaling.original_context_length")}
    if kind not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported")
    if rope_freqs is not None:  # Llama 3.1+: the converter stores llama3 scaling as per-frequency divisors
        return llama3_scaling_from_factors(read_tensor(rope_freqs).double(), head_dim, theta)
    return None


def llama3_scaling_from_factors(factors: torch.Tensor, head_dim: int, theta: float) -> dict:
    """Recover HF's llama3 rope_scaling dict from the divisors llama.cpp computed from it.

    Divisors are 1 (high frequencies), `factor` (low ones) and a smooth blend between; with the
    low/high frequency factors every Llama 3.x uses, one blended divisor gives the original context
    length. The result is checked against every divisor, so a file that differs fails loudly.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    low, high = 1.0, 4.0
    mid = ((factors > 1 + 1e-6) & (factors < factor - 1e-6)).nonzero()
    if len(mid):
        i = int(mid[0])
        smooth = (1 / factors[i] - 1 / factor) / (1 - 1 / factor)
        old_len = round(float(wavelen[i] * (smooth * (high - low) + low)))
    else:
        old_len = 8192
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old_len}
    if not torch.allclose(llama3_factors(scaling, wavelen), factors, rtol=1e-4):
        raise ValueError("GGUF rope_freqs tensor does not match llama3 rope scaling")
    return scaling


def llama3_factors(s: dict, wavelen: torch.Tensor) -> torch.Tensor:
    """Per-frequency divisors of llama3 rope scaling (as llama.cpp's converter writes rope_freqs)."""
    old_len, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    smooth = (old_len / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / s["factor"] + smooth)
    out = torch.where(wavelen > old_len / low, torch.full_like(wavelen, s["factor"]), blended)
    return torch.where(wavelen < old_len / high, torch.ones_like(wavelen), out)


def _meta(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default

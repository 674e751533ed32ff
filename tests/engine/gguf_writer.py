"""GGUF files written as llama.cpp's converter (convert_hf_to_gguf.py) writes them: names, the Q/K
permutation of llama-family models, stacked experts, metadata. The tests read them back with our loader."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from shared.engine.quant import GGML_TYPES, QuantizedWeight, quantize_weight

Q = gguf.GGMLQuantizationType

# llama.cpp tensor names, written out here rather than taken from the loader so a wrong map shows.
GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# expert tensors, stacked into one [E, out, in] tensor per layer
GGUF_EXPERTS = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}  # else the same name
GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes Q and K."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(s: dict, head_dim: int, theta: float) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for llama3 scaling."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(s["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path: Path, folder_ckpt, state_dict: dict, qtype: Q = Q.F32) -> None:
    """A GGUF of this model as llama.cpp's converter writes one (names, Q/K permutation, metadata)."""
    c, tok = folder_ckpt.config, folder_ckpt.tokenizer
    llama = c.architecture in ("llama", "mixtral")
    w = gguf.GGUFWriter(str(path), GGUF_ARCH.get(c.architecture, c.architecture))
    w.add_name(f"tiny-{c.architecture}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if not llama:
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if c.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if llama:
        w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size)
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    vocab = json.loads(tok.tokenizer.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if tok.is_special(i) else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    if c.rope_scaling:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(c.rope_scaling, c.head_dim, c.rope_theta))
    for gname, t in gguf_tensors(state_dict, c):
        x = t.float().numpy()
        q = qtype if x.ndim >= 2 else Q.F32  # llama.cpp keeps norms in F32
        if q in K_QUANTIZERS and x.shape[-1] % 256:
            q = Q.Q8_0  # as llama.cpp's quantizer does where a row is no whole number of super-blocks
        blocks = K_QUANTIZERS[q](x) if q in K_QUANTIZERS else gguf.quants.quantize(x, q)
        w.add_tensor(gname, blocks, raw_dtype=None if q in (Q.F32, Q.F16) else q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_tensors(state_dict: dict, c) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) in llama.cpp's layout: Q/K permuted for llama, experts stacked per layer."""
    out, experts = [], {}
    for name, t in state_dict.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when untied
        base, kind = name.rsplit(".", 1)
        if base in GGUF_GLOBAL:
            out.append((f"{GGUF_GLOBAL[base]}.{kind}", t))
            continue
        _, _, layer, rest = base.split(".", 3)
        if ".experts." in rest:
            _, index, proj = rest.rsplit(".", 2)
            experts.setdefault(f"blk.{layer}.{GGUF_EXPERTS[proj]}.{kind}", {})[int(index)] = t
            continue
        if c.architecture in ("llama", "mixtral") and rest == "self_attn.q_proj":
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif c.architecture in ("llama", "mixtral") and rest == "self_attn.k_proj":
            t = llama_cpp_permute(t, c.num_key_value_heads)
        elif rest == "mlp.shared_expert_gate":
            t = t.reshape(-1)  # llama.cpp keeps it as a vector
        out.append((f"blk.{layer}.{GGUF_LAYER[rest]}.{kind}", t))
    out += [(name, torch.stack([per[e] for e in sorted(per)])) for name, per in experts.items()]
    return out


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x [..., n] (n a multiple of 256) -> its Q4_K blocks [..., n / 256 * 144] (the gguf package has no K-quant
    quantizer): per 32 weights a 4-bit step from their min (or 0) to their max, whose step and minimum are 6-bit
    multiples of the super-block's fp16 d and dmin. Plain rounding, not llama.cpp's search for the best scales."""
    header, q = _k_blocks(x, 15)
    nibbles = (q[:, 0::2] | q[:, 1::2] << 4).reshape(-1, 128)  # blocks 2i and 2i + 1 share 32 bytes
    return np.concatenate([header, nibbles], axis=1).reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """As quantize_q4_k with 5-bit quants: [..., n / 256 * 176], bit 4 of block j's quants in bit j of 32 bytes."""
    header, q = _k_blocks(x, 31)
    low = q & 0x0F
    nibbles = (low[:, 0::2] | low[:, 1::2] << 4).reshape(-1, 128)
    fifths = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)  # [N, 32]
    blocks = np.concatenate([header, fifths, nibbles], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // 256 * 176)


def _k_blocks(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's shared part: per super-block its 16 header bytes (fp16 d and dmin, 12 bytes of 6-bit scales and
    minimums) [N, 16], and its quants [N, 8 blocks, 32] in 0 .. levels."""
    rows = x.reshape(-1, 8, 32).astype(np.float32)
    low, high = np.minimum(rows.min(-1), 0), rows.max(-1)
    step, minimum = (high - low) / levels, -low
    d = (step.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (minimum.max(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.round(np.divide(step, d, out=np.zeros_like(step), where=d > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(minimum, dmin, out=np.zeros_like(minimum), where=dmin > 0)), 0, 63).astype(np.uint8)
    scale = (d.astype(np.float32) * sc)[..., None]
    shifted = rows + (dmin.astype(np.float32) * m)[..., None]
    q = np.clip(np.round(np.divide(shifted, scale, out=np.zeros_like(rows), where=scale > 0)), 0, levels)
    # bytes 0-3: scales 0-3 (and the top bits of 4-7), 4-7: minimums likewise, 8-11: the rest of 4-7
    high_scales, high_minimums = (sc[:, 4:] >> 4) << 6, (m[:, 4:] >> 4) << 6
    packed = np.concatenate(
        [sc[:, :4] | high_scales, m[:, :4] | high_minimums, (sc[:, 4:] & 0x0F) | (m[:, 4:] << 4)], axis=1
    )
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed], axis=1), q.astype(np.uint8)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x [..., n] (n a multiple of 256) -> its Q6_K blocks [..., n / 256 * 210]: per 16 weights a signed step of
    max |x| / 31, an 8-bit multiple of the super-block's fp16 d. Plain rounding, as quantize_q4_k."""
    rows = x.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(rows).max(-1) / 31
    d = (step.max(-1, keepdims=True) / 127).astype(np.float16)
    sc = np.clip(np.round(np.divide(step, d, out=np.zeros_like(step), where=d > 0)), -128, 127).astype(np.int8)
    scale = (d.astype(np.float32) * sc)[..., None]
    q = np.clip(np.round(np.divide(rows, scale, out=np.zeros_like(rows), where=scale != 0)), -32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # halves of 128, their 4 blocks of 32
    low, top = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=-1)
    qh = top[:, :, 0] | top[:, :, 1] << 2 | top[:, :, 2] << 4 | top[:, :, 3] << 6
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // 256 * 210)


# the gguf package quantizes no K-quant
K_QUANTIZERS = {Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}


def quantize_blocks(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """`weight` [out, in] in block format `format` (a key of GGML_TYPES); K-quants by the quantizers above."""
    if (quantizer := K_QUANTIZERS.get(GGML_TYPES[format])) is not None:
        return QuantizedWeight(format, torch.from_numpy(quantizer(weight.numpy())), weight.shape[1])
    return quantize_weight(weight, format)

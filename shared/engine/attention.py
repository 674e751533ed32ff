"""Paged attention over a flat KV slot pool, in batched ops (no loop over tokens).

One step's tokens come flattened: first the decode queries (one per decoding sequence, or with weights in
block formats one per token a sequence verifies for speculative decoding: see ModelRunner), then the
multi-token chunks (prefill chunks, or the k+1 tokens being verified otherwise). The decodes run in the C++
kernel that reads KV blocks in place where it applies (fp32 on CPU), else like the chunks: one
scaled_dot_product_attention call over keys gathered from the pool through the block tables.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.engine import cpu_kernels


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] pool slot each new token's K/V is written to
    num_decode_tokens: int  # tokens [0, num_decode_tokens) are decode queries, each with its own context
    decode_blocks: torch.Tensor | None = None  # [Bd, nb] block table of each decode, padded
    decode_context_lens: torch.Tensor | None = None  # [Bd] keys each decode sees, its own included
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, nb * block_size] True where a key is visible
    chunk_token_index: torch.Tensor | None = None  # [Bc, Qc] flat token index of each chunk query
    chunk_valid: torch.Tensor | None = None  # [Bc, Qc] False on padding
    chunk_blocks: torch.Tensor | None = None  # [Bc, nb]
    chunk_mask: torch.Tensor | None = None  # [Bc, 1, Qc, nb * block_size] causal, after the cached context


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim]. -> [T, heads, head_dim]."""
    out = q.new_empty(q.shape)
    nd = meta.num_decode_tokens
    if nd and cpu_kernels.usable(q):
        out[:nd] = cpu_kernels.load().paged_decode_attention(
            q[:nd].contiguous(), k_cache, v_cache, meta.decode_blocks, meta.decode_context_lens, scale
        )
    elif nd:
        out[:nd] = _attend(q[:nd].unsqueeze(2), k_cache, v_cache, meta.decode_blocks, meta.decode_mask, scale).squeeze(
            2
        )
    if meta.chunk_token_index is not None:
        # [Bc, Qc, H, D] -> [Bc, H, Qc, D]; padded queries read token 0 and are dropped below.
        qc = q[meta.chunk_token_index].transpose(1, 2)
        oc = _attend(qc, k_cache, v_cache, meta.chunk_blocks, meta.chunk_mask, scale).transpose(1, 2)
        out[meta.chunk_token_index[meta.chunk_valid]] = oc[meta.chunk_valid]
    return out


def _attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # Gather whole blocks (rows of block_size * kv_heads * head_dim): far cheaper than per-slot gathers.
    shape = (blocks.shape[0], -1, *k_cache.shape[2:])
    k = k_cache.index_select(0, blocks.flatten()).view(shape).transpose(1, 2)  # [B, kv_heads, L, D]
    v = v_cache.index_select(0, blocks.flatten()).view(shape).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

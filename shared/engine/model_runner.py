"""Inputs for one step, the paged KV pool, and the forward pass.

The pool is one preallocated tensor per K and V: [layers, blocks, block_size, kv_heads, head_dim].
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from shared.engine import cpu_kernels, ops
from shared.engine.attention import AttentionMetadata
from shared.engine.config import ModelConfig
from shared.engine.model import CausalLM
from shared.engine.multimodal import ImageEncoder, image_rows
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence

KvLayout = tuple[tuple[int, ...], torch.dtype]  # (layers, block_size, kv_heads, head_dim), dtype


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        image_encoder: ImageEncoder | None = None,
    ):
        self.model = model
        self.image_encoder = image_encoder
        self.block_size = block_size
        self.device = device
        # Weights in block formats: the kernels' activation rounding turns any float difference into a possibly
        # different greedy token, so each step says which rows are prompt tokens (ops.prompt_rows), and a
        # sequence verifying draft tokens runs each as a decode query, the same bits drafted or decoded.
        self.runs_blocks = any(getattr(m, "quantized", None) is not None for m in model.modules())
        cfg = model.config
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: masked-out keys still get multiplied by 0, and 0 * NaN garbage is NaN
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.k_cache[i], self.v_cache[i]

    @property
    def kv_layout(self) -> KvLayout:
        """What a KV copy between workers agrees on: the pool's shape but for its blocks, and its dtype."""
        return (self.k_cache.shape[0], *self.k_cache.shape[2:]), self.k_cache.dtype

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of K and V of one block across all layers."""
        elems = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim
        return elems * torch.empty(0, dtype=dtype).element_size()

    @torch.inference_mode()
    def run(
        self, batch: list[ScheduledSeq], after_layer: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward one step; returns logits of the sequences that sample (1 + their draft tokens rows each),
        and those sequences. `after_layer(i)` runs once layer i's KV is in the cache."""
        as_decodes = [s.num_new_tokens == 1 or (self.runs_blocks and s.num_draft_tokens > 0) for s in batch]
        decodes = [s for s, decode in zip(batch, as_decodes) if decode]
        chunks = [s for s, decode in zip(batch, as_decodes) if not decode]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        is_prompt: list[bool] = []
        sampling: list[Sequence] = []
        image_chunks = []  # (seq, start, end, first row) of the chunks of prompts with images
        for s in decodes + chunks:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            if seq.images and start < seq.num_prompt_tokens:
                image_chunks.append((seq, start, end, len(input_ids)))
            input_ids += seq.token_ids[start : end - s.num_draft_tokens] + seq.spec_token_ids[: s.num_draft_tokens]
            positions += range(start, end)
            if self.runs_blocks:
                is_prompt += [p < seq.num_prompt_tokens for p in range(start, end)]
            slots += self._slots(seq.block_table, start, end)
            if s.samples:  # the last token's logits, and each draft token's
                logits_rows += range(len(input_ids) - 1 - s.num_draft_tokens, len(input_ids))
                sampling.append(seq)
        if not input_ids:
            return torch.empty(0), []
        # each decode row a query over its sequence's keys up to its own
        queries = [
            (s.seq.block_table, s.seq.num_computed_tokens + i + 1) for s in decodes for i in range(s.num_new_tokens)
        ]
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), num_decode_tokens=len(queries))
        if queries:
            meta.decode_blocks, ctx_lens = self._block_tables(queries)
            meta.decode_context_lens = ctx_lens.to(self.device)
            if not cpu_kernels.usable(self.k_cache):  # only the torch path (gather + SDPA) needs a mask
                keys = torch.arange(meta.decode_blocks.shape[1] * self.block_size)
                mask = keys < ctx_lens.unsqueeze(1)
                # no mask at all when every key is visible (one decode on full blocks): SDPA's fast path
                meta.decode_mask = None if mask.all() else mask.view(len(queries), 1, 1, -1).to(self.device)
        if chunks:
            self._chunk_metadata(chunks, len(queries), meta)
        images = image_rows(self.image_encoder, image_chunks, self.device) if image_chunks else None
        with self._rows(is_prompt):
            hidden = self.model(self._tensor(input_ids), self._tensor(positions), meta, after_layer, images)
        if not logits_rows:
            return torch.empty(0), []
        with self._rows([is_prompt[i] for i in logits_rows] if self.runs_blocks else []):
            return self.model.compute_logits(hidden[self._tensor(logits_rows)]), sampling

    def _rows(self, is_prompt: list[bool]) -> AbstractContextManager:
        return ops.prompt_rows(is_prompt) if self.runs_blocks else nullcontext()

    def _chunk_metadata(self, chunks: list[ScheduledSeq], offset: int, meta: AttentionMetadata) -> None:
        q_lens = torch.tensor([s.num_new_tokens for s in chunks])
        starts = torch.tensor([s.seq.num_computed_tokens for s in chunks])
        q_offsets = offset + torch.cumsum(q_lens, 0) - q_lens
        q_pos = torch.arange(int(q_lens.max()))
        valid = q_pos < q_lens.unsqueeze(1)
        token_index = torch.where(valid, q_offsets.unsqueeze(1) + q_pos, 0)
        blocks, _ = self._block_tables(
            [(s.seq.block_table, s.seq.num_computed_tokens + s.num_new_tokens) for s in chunks]
        )
        k_pos = torch.arange(blocks.shape[1] * self.block_size)
        # key j is visible to query i of a chunk starting at `start` iff j <= start + i
        mask = k_pos.view(1, 1, -1) <= (starts.view(-1, 1, 1) + q_pos.view(1, -1, 1))
        meta.chunk_token_index = token_index.to(self.device)
        meta.chunk_valid = valid.to(self.device)
        meta.chunk_blocks = blocks
        meta.chunk_mask = mask.unsqueeze(1).to(self.device)

    def _block_tables(self, queries: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (block table, context length): the blocks covering the context (padded), and the length."""
        ctx_lens = [n for _, n in queries]
        num_blocks = -(-max(ctx_lens) // self.block_size)
        tables = [table[: -(-n // self.block_size)] for table, n in queries]
        padded = [t + [0] * (num_blocks - len(t)) for t in tables]
        return self._tensor(padded), torch.tensor(ctx_lens)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def copy_block(self, src: int, dst: int) -> None:
        for cache in (self.k_cache, self.v_cache):
            cache[:, dst] = cache[:, src]

    def read_blocks(
        self, block_ids: list[int], layer: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of some blocks of one layer: [n, block_size, kv_heads, head_dim] each (into `out`)."""
        idx = self._tensor(block_ids)
        if out is None:
            return self.k_cache[layer, idx], self.v_cache[layer, idx]
        for cache, dst in zip((self.k_cache, self.v_cache), out):
            if dst.device == cache.device:
                torch.index_select(cache[layer], 0, idx, out=dst)  # one copy, no temporary
            else:
                dst.copy_(cache[layer, idx])
        return out

    def write_blocks(self, block_ids: list[int], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        idx = self._tensor(block_ids)
        self.k_cache[layer, idx] = k.to(self.device, self.k_cache.dtype)
        self.v_cache[layer, idx] = v.to(self.device, self.v_cache.dtype)

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Every layer of some blocks at once: kv is [layers, 2 (K, V), n, block_size, kv_heads, head_dim]."""
        idx = self._tensor(block_ids)
        self.k_cache[:, idx] = kv[:, 0].to(self.device, self.k_cache.dtype)
        self.v_cache[:, idx] = kv[:, 1].to(self.device, self.v_cache.dtype)


def split_rows(logits: torch.Tensor, sampling: list[Sequence]) -> tuple[list[int], dict[int, torch.Tensor]]:
    """`run` gives each sampling sequence 1 + its draft tokens rows: the first rows' indices, and the draft
    rows by seq_id."""
    first, drafts, row = [], {}, 0
    for seq in sampling:
        first.append(row)
        if seq.spec_token_ids:
            drafts[seq.seq_id] = logits[row + 1 : row + 1 + len(seq.spec_token_ids)]
        row += 1 + len(seq.spec_token_ids)
    return first, drafts

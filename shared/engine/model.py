"""Decoder-only transformer for the Llama family, Qwen2/2.5, Qwen3 and their mixture-of-experts kin
(Mixtral, Qwen2-MoE, Qwen3-MoE), named as in the HF checkpoints.

The differences between these architectures are flags on ModelConfig: `attention_bias` (Qwen2's q/k/v
bias), `qk_norm` (Qwen3's per-head RMSNorm on q and k) and the MoE fields (which layers' MLP is a
SparseMoeBlock, shared/engine/moe.py). Everything else is shared. q/k/v and gate/up projections are
packed into one matmul each (fewer, larger matmuls run faster, most of all at batch 1); PACKED maps
checkpoint names onto those packed weights.
"""

from collections.abc import Callable

import torch
from torch import nn

from shared.engine import ops
from shared.engine.attention import AttentionMetadata, paged_attention
from shared.engine.config import ModelConfig
from shared.engine.layers import MLP, PACKED, Embedding, Linear, PackedLinear, RMSNorm, keep_quantized
from shared.engine.moe import EXPERT_TENSOR, Experts, SparseMoeBlock, checkpoint_name
from shared.engine.quant import BLOCK, QuantizedWeight, quantize_weight
from shared.engine.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=config.attention_bias
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim**-0.5
        # Set by the model runner: this layer's slice of the paged KV pool, [slots, kv_heads, head_dim].
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rotary_and_cache(q, k, v, *rope, self.k_cache, self.v_cache, meta.slot_mapping)
        o = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.view(t, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream is carried beside the layer's output and added inside the next
    norm (one fused op instead of an add and a norm): returns (output, residual), output not yet added."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(index):
            self.mlp = SparseMoeBlock(config, index)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, meta), residual)
        return self.mlp(h), residual


class Model(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        after_layer: Callable[[int], None] | None = None,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if images is not None:  # (rows, embeddings): an image's placeholders take the vision encoder's output
            rows, embeds = images
            x[rows] = embeds.to(x.dtype)
        rope = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, meta)
            if after_layer is not None:  # layer i's KV is in the cache: e.g. stream it out meanwhile
                after_layer(i)
        return self.norm(x, residual)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = Model(config, max_positions or config.max_position_embeddings)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.lm_head.quantized = self.model.embed_tokens.quantized

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        after_layer: Callable[[int], None] | None = None,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Flattened tokens of one step -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta, after_layer, images)

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        max_positions: int,
        device: torch.device,
        dtype: torch.dtype,
        keep_blocks: bool = False,
        quantize: str | None = None,
    ) -> "CausalLM":
        """The model on `device` in `dtype`, weights loaded. Built and cast on the meta device, so no
        memory is allocated twice (nor in fp32 first). With `keep_blocks`, projections that come in a block
        format (QuantizedWeight) stay in it; `quantize` names a block format fp projections are quantized into."""
        with torch.device("meta"):
            model = cls(config, max_positions).to(dtype)
        model = model.to_empty(device=device)
        model.tie_weights()
        model.model.rotary = RotaryEmbedding(config, max_positions).to(device)  # its tables were on meta
        model.load_weights(weights, keep_blocks)
        if quantize:
            model.quantize(quantize)
        model.tie_weights()
        model.prepack_weights()
        return model.eval()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def prepack_weights(self, max_bytes: int = 4 << 30) -> None:
        """On CPU, keep a oneDNN-packed fp32 copy of every linear weight for steps of more than a few rows
        (~25% faster at 32 rows here; for a weight in a block format, several times faster than dequantizing
        it at each step). It costs the weights' fp32 size again, so only for models whose linear weights take
        at most `max_bytes` in fp32; call it after loading the weights."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        if sum(m.in_features * m.out_features * 4 for m in linears) <= max_bytes:
            for module in linears:
                fp = module.weight if module.quantized is None else module.quantized.dequantize()
                module.packed = ops.prepack_weight(fp)

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor | QuantizedWeight], keep_blocks: bool = False) -> None:
        """Checkpoint names are our names, except the packed projections (see PACKED) and the experts' own
        tensors (shared/engine/moe.py)."""
        params, modules, expected = dict(self.named_parameters()), dict(self.named_modules()), self.expected_keys()
        loaded: set[str] = set()
        blocks: dict[str, dict[int, QuantizedWeight]] = {}  # packed module -> its shards in a block format
        for name, tensor in weights.items():
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            name = checkpoint_name(name)
            module_path, _, kind = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if isinstance(tensor, QuantizedWeight) and keep_blocks:
                if leaf in PACKED and kind == "weight":
                    blocks.setdefault(f"{parent}.{PACKED[leaf][0]}", {})[PACKED[leaf][1]] = tensor
                    loaded.add(f"{parent}.{PACKED[leaf][0]}.weight#{PACKED[leaf][1]}")
                    continue
                if isinstance(modules.get(module_path), Linear | Embedding) and kind == "weight":
                    keep_quantized(modules[module_path], tensor)
                    loaded.add(name)
                    continue
            if isinstance(tensor, QuantizedWeight):  # experts, or blocks not kept: fp as ever
                tensor = tensor.dequantize()
            if expert := EXPERT_TENSOR.fullmatch(name):
                key = modules[expert["experts"]].load_expert(int(expert["index"]), expert["proj"], tensor)
                loaded.add(f"{expert['experts']}.{key}")
                continue
            if leaf in PACKED:
                packed_name, index = PACKED[leaf]
                packed = modules[f"{parent}.{packed_name}"]
                packed.shard(getattr(packed, kind), index).copy_(tensor)
                loaded.add(f"{parent}.{packed_name}.{kind}#{index}")
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            params[name].copy_(tensor)
            loaded.add(name)
        if missing := expected - loaded:
            raise KeyError(f"checkpoint lacks {sorted(missing)[:5]}")
        for path, shards in blocks.items():
            self._load_packed_blocks(modules[path], shards)

    def _load_packed_blocks(self, packed: PackedLinear, shards: dict[int, QuantizedWeight]) -> None:
        """Shards all in one block format: one weight of their rows in order. Otherwise they are dequantized
        (a file may store q/k/v in different formats)."""
        parts = [shards.get(i) for i in range(len(packed.shard_sizes))]
        if None not in parts and len({part.format for part in parts}) == 1:
            keep_quantized(packed, parts[0].with_data(torch.cat([part.data for part in parts])))
            return
        for index, part in enumerate(parts):
            if part is not None:
                packed.shard(packed.weight, index).copy_(part.dequantize())

    def quantize(self, format: str) -> None:
        """Every fp projection and the embedding into `format` (those whose input is a whole number of blocks).
        With 4-bit formats the output projection (and the embedding tied to it) takes 8 bits, as llama.cpp's
        quantizer does: the logits are what sampling reads."""
        tied = self.config.tie_word_embeddings
        head = "model.embed_tokens" if tied else "lm_head"
        for name, module in self.named_modules():
            if not isinstance(module, Linear | Embedding) or module.quantized is not None:
                continue
            if tied and name == "lm_head":
                continue  # it follows the embedding (tie_weights)
            if module.weight.shape[1] % BLOCK == 0:
                keep_quantized(module, quantize_weight(module.weight, "q8_0" if name == head else format))

    def expected_keys(self) -> set[str]:
        """What a checkpoint must supply: every parameter (a tied one once), a packed one shard by shard,
        the experts' one tensor per expert."""
        modules = dict(self.named_modules())
        expected = set()
        for name in dict(self.named_parameters()):
            path = name.rpartition(".")[0]
            module = modules[path]
            if isinstance(module, Experts):
                expected |= {f"{path}.{key}" for key in module.expected_keys()}
            elif isinstance(module, PackedLinear):
                expected |= {f"{name}#{i}" for i in range(len(module.shard_sizes))}
            else:
                expected.add(name)
        return expected

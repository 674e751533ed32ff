"""Decoder-only transformer for the Llama family, Qwen2/2.5 and Qwen3, named as in the HF checkpoints.

The differences between these architectures are two flags on ModelConfig: `attention_bias`
(Qwen2's q/k/v bias) and `qk_norm` (Qwen3's per-head RMSNorm on q and k). Everything else is shared.
q/k/v and gate/up projections are packed into one matmul each (fewer, larger matmuls run faster,
most of all at batch 1); PACKED maps checkpoint names onto those packed weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.attention import AttentionMetadata, paged_attention, write_kv
from shared.engine.config import ModelConfig
from shared.engine.rotary import RotaryEmbedding, apply_rotary

# checkpoint module name -> (our packed module, shard index)
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Linear(nn.Linear):
    """nn.Linear with the matmul forms measured fastest on this CPU (docs/performance.md): W @ x.T for
    several rows (faster here than F.linear's x @ W.T), and for one row (batch-1 decode) a GEMV on an
    [in, out] copy of the weight, when the model keeps one (see CausalLM.keep_gemv_copies)."""

    weight_t: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] == 1 and self.weight_t is not None:
            y = x @ self.weight_t
        else:
            y = torch.mm(self.weight, x.t()).t()
        return y if self.bias is None else y + self.bias


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written out: measured faster than F.rms_norm for the small rows of decode steps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim**-0.5
        # Set by the model runner: this layer's slice of the paged KV pool, [slots, kv_heads, head_dim].
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, *rope)
        write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = PackedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, rope, meta)
        return self.norm(x)


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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Flattened tokens of one step -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def keep_gemv_copies(self, max_bytes: int = 4 << 30) -> None:
        """On CPU, keep an [in, out] copy of every linear weight for batch-1 GEMVs (~20% faster here).
        It doubles the weights' memory, so only for models whose linear weights fit in `max_bytes`."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        if self.lm_head.weight.device.type != "cpu" or size > max_bytes:
            return
        for module in linears:
            module.weight_t = module.weight.data.t().contiguous()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Checkpoint names are our names, except the packed projections (see PACKED)."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights.items():
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight"
                                                         and self.config.tie_word_embeddings):
                continue
            module_path, _, kind = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
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
        expected = set()
        for name in params:
            module = modules[name.rpartition(".")[0]]
            shards = len(module.shard_sizes) if isinstance(module, PackedLinear) else 0
            expected |= {f"{name}#{i}" for i in range(shards)} if shards else {name}
        if missing := expected - loaded:
            raise KeyError(f"checkpoint lacks {sorted(missing)[:5]}")

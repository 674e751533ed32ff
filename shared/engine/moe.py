"""Mixture-of-experts feed-forward (Qwen2-MoE, Qwen3-MoE, Mixtral), named as transformers 5 names it in
memory: `mlp.gate` (the router), `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]
(every expert's weights stacked), and Qwen2-MoE's `mlp.shared_expert` + `mlp.shared_expert_gate`.

Checkpoints store one tensor per expert (`mlp.experts.3.gate_proj.weight`; Mixtral's
`block_sparse_moe.experts.3.w1.weight`): `checkpoint_name` and `Experts.load_expert` put them in place.

Expert compute is grouped: the step's (token, expert) pairs are sorted by expert and each active expert
runs one matmul over its contiguous rows, whatever the number of tokens.
"""

import re

import torch
from torch import nn

from shared.engine import ops
from shared.engine.config import ModelConfig
from shared.engine.layers import MLP, Linear

MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
EXPERT_TENSOR = re.compile(r"(?P<experts>.*\.experts)\.(?P<index>\d+)\.(?P<proj>\w+)\.weight")


def checkpoint_name(name: str) -> str:
    """Mixtral's checkpoint names -> the shared ones (`block_sparse_moe.` -> `mlp.`, w1/w3/w2 -> gate/up/down)."""
    if ".block_sparse_moe." not in name:
        return name
    name = name.replace(".block_sparse_moe.", ".mlp.")
    match = EXPERT_TENSOR.fullmatch(name)
    if match and match["proj"] in MIXTRAL_PROJ:
        name = f"{match['experts']}.{match['index']}.{MIXTRAL_PROJ[match['proj']]}.weight"
    return name


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Tokens routed to each expert since the last `take_load()`: what expert balancing reads. On the CPU
        # whatever the model's device (the model is built on the meta device first).
        self.load = torch.zeros(num_experts, dtype=torch.int64, device="cpu")

    @torch.no_grad()
    def load_expert(self, index: int, proj: str, tensor: torch.Tensor) -> str:
        """Copy one checkpoint tensor of expert `index` into place; returns its key for the loaded-set check."""
        size = self.intermediate_size
        if proj == "gate_proj":
            self.gate_up_proj[index, :size].copy_(tensor)
        elif proj == "up_proj":
            self.gate_up_proj[index, size:].copy_(tensor)
        elif proj == "down_proj":
            self.down_proj[index].copy_(tensor)
        else:
            raise KeyError(f"expert tensor {proj!r} has no place in the model")
        return f"{proj}#{index}"

    def expected_keys(self) -> set[str]:
        return {f"{proj}#{e}" for proj in ("gate_proj", "up_proj", "down_proj") for e in range(self.num_experts)}

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; expert_ids and weights [T, k]: token t goes to expert_ids[t, j] with weight weights[t, j]."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        self.load += counts.cpu()
        token = order // top_k
        rows = x[token]
        out = torch.empty_like(rows)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                h = ops.silu_and_mul(ops.linear(rows[start : start + n], self.gate_up_proj[expert], None))
                out[start : start + n] = ops.linear(h, self.down_proj[expert], None)
                start += n
        out *= weights.flatten()[order].unsqueeze(1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)

    def take_load(self) -> torch.Tensor:
        """The per-expert token counts since the last call, and a fresh count."""
        load, self.load = self.load, torch.zeros_like(self.load)
        return load


class SparseMoeBlock(nn.Module):
    """Router softmax over all experts in fp32, the top k kept (renormalized to sum 1 when the config says),
    the chosen experts' outputs summed by those weights; plus a sigmoid-gated shared expert (Qwen2-MoE)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, expert_ids, weights)
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

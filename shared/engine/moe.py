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
from shared.engine.eplb import Placement, default_placement
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
    """The experts this process holds: slot s holds logical expert `slot_experts[s]` (all of them, in order,
    without expert parallelism; a share, maybe with copies of hot experts, with it)."""

    def __init__(self, slot_experts: list[int], hidden_size: int, intermediate_size: int):
        super().__init__()
        self.slot_experts, self.intermediate_size = list(slot_experts), intermediate_size
        num_slots = len(slot_experts)
        self.gate_up_proj = nn.Parameter(torch.empty(num_slots, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_slots, hidden_size, intermediate_size))

    @torch.no_grad()
    def load_expert(self, index: int, proj: str, tensor: torch.Tensor) -> str:
        """Copy one checkpoint tensor of logical expert `index` into each slot holding it (none: not ours);
        returns its key for the loaded-set check."""
        size = self.intermediate_size
        for slot in (s for s, e in enumerate(self.slot_experts) if e == index):
            if proj == "gate_proj":
                self.gate_up_proj[slot, :size].copy_(tensor)
            elif proj == "up_proj":
                self.gate_up_proj[slot, size:].copy_(tensor)
            elif proj == "down_proj":
                self.down_proj[slot].copy_(tensor)
            else:
                raise KeyError(f"expert tensor {proj!r} has no place in the model")
        return f"{proj}#{index}"

    @property
    def expert_bytes(self) -> int:
        """The weights of one expert: what moving it between ranks sends."""
        return (self.gate_up_proj[0].numel() + self.down_proj[0].numel()) * self.down_proj.element_size()

    def expected_keys(self) -> set[str]:
        return {f"{proj}#{e}" for proj in ("gate_proj", "up_proj", "down_proj") for e in set(self.slot_experts)}

    def forward(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; slots and weights [T, k]: token t goes to local slot slots[t, j] (-1: held elsewhere) with
        weight weights[t, j]. Returns the weighted sum of this process's experts' outputs, [T, H]."""
        top_k = slots.shape[1]
        flat = slots.flatten()
        pairs = (flat >= 0).nonzero().squeeze(1)
        pairs = pairs[flat[pairs].argsort(stable=True)]
        token = pairs // top_k
        rows = x[token]
        out = torch.empty_like(rows)
        start = 0
        for slot, n in enumerate(torch.bincount(flat[pairs], minlength=len(self.slot_experts)).tolist()):
            if n:
                h = ops.silu_and_mul(ops.linear(rows[start : start + n], self.gate_up_proj[slot], None))
                out[start : start + n] = ops.linear(h, self.down_proj[slot], None)
                start += n
        out *= weights.flatten()[pairs].unsqueeze(1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)

    @torch.no_grad()
    def keep_slots(self, slot_experts: list[int]) -> None:
        """Hold only `slot_experts` (logical ids, from the experts held now): a rank's share."""
        index = torch.tensor([self.slot_experts.index(e) for e in slot_experts])
        self.hold(slot_experts, self.gate_up_proj[index], self.down_proj[index])

    def hold(self, slot_experts: list[int], gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Switch to these weights (slot s holding logical expert slot_experts[s])."""
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        self.slot_experts = list(slot_experts)


class SparseMoeBlock(nn.Module):
    """Router softmax over all experts in fp32, the top k kept (renormalized to sum 1 when the config says),
    the chosen experts' outputs summed by those weights; plus a sigmoid-gated shared expert (Qwen2-MoE).

    With expert parallelism (`distribute`) this process holds a share of the experts: the routed tokens go
    to every rank of the group (shared/engine/expert_parallel.py), each computes its experts' part, and the
    parts are summed here."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index, self.num_experts = layer_index, config.num_experts
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(list(range(config.num_experts)), config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        self.group = None
        self.placement = default_placement(config.num_experts, 1)
        self.replicas, self.copies = self.placement.routing_table()
        # Tokens routed to each logical expert since the last `take_load()`: what expert balancing reads. Kept
        # on the model's device, so counting costs no device sync per step.
        self.load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts)
        self.load = counts if self.load is None else self.load.add_(counts)
        slots = self.route(expert_ids)
        if self.group is None:
            out = self.experts(x, slots, weights)
        else:
            out = self.group.run_experts(self.layer_index, self.experts, x, slots, weights)
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def route(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Logical experts [T, k] -> physical slots: token t takes copy t mod (copies) of each expert."""
        if self.replicas.device != expert_ids.device:  # once per placement: the tables are made on the CPU
            self.replicas, self.copies = self.replicas.to(expert_ids.device), self.copies.to(expert_ids.device)
        position = torch.arange(expert_ids.shape[0], device=expert_ids.device).unsqueeze(1)
        return self.replicas[expert_ids, position % self.copies[expert_ids]]

    def distribute(self, group, placement: Placement) -> None:
        """Keep this rank's share of `placement`; run the experts across `group` from now on."""
        self.group = group
        self.experts.keep_slots(group.local_slots(placement))
        self.use(placement)

    def use(self, placement: Placement) -> None:
        """Route by `placement` from now on (every rank holds its share of it)."""
        self.placement = placement
        self.replicas, self.copies = placement.routing_table()

    def take_load(self) -> torch.Tensor:
        """The per-expert token counts since the last call (on the CPU), and a fresh count."""
        load, self.load = self.load, None
        return torch.zeros(self.num_experts, dtype=torch.int64) if load is None else load.cpu()

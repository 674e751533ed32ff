"""Expert placement for expert parallelism: which logical expert each physical slot holds, per layer.

N ranks hold S slots each (N * S = experts + redundant copies); rank r holds slots [r*S, (r+1)*S).
`balanced_placement` is DeepSeek EPLB's recipe on one node: the redundant slots go, one at a time, to the
expert with the most tokens per copy; then the copies, heaviest first, each go to the rank with the least
load that still has a free slot. A token routed to an expert with several copies goes to one of them in
turn (by its position in the step), so the copies share the expert's load.
"""

from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class Placement:
    slots: list[int]  # physical slot -> logical expert
    num_experts: int

    def routing_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """replicas [E, most copies] (each expert's slots, padded by repeating the first) and counts [E]."""
        copies: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(self.slots):
            copies[expert].append(slot)
        widest = max(len(c) for c in copies)
        replicas = torch.tensor([c + [c[0]] * (widest - len(c)) for c in copies], dtype=torch.long, device="cpu")
        return replicas, torch.tensor([len(c) for c in copies], dtype=torch.long, device="cpu")

    def slot_loads(self, expert_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
        """Tokens per slot, [ranks, slots per rank], if `expert_load` [E] is split evenly over the copies."""
        per_copy = expert_load.double() / self.routing_table()[1]
        return per_copy[torch.tensor(self.slots)].view(num_ranks, -1)

    def rank_loads(self, expert_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
        """Tokens per rank if `expert_load` [E] is split evenly over each expert's copies."""
        return self.slot_loads(expert_load, num_ranks).sum(1)


class ExpertCost:
    """Seconds one rank spends on one layer's experts in a step: `per_expert` for each expert it runs (its
    weights read, whatever the rows) + `per_token` for each routed token, fitted by least squares to the
    steps rank 0 measured. Decode steps with few tokens per expert cost mostly the first term, large
    prefill steps the second: balancing tokens pays only in proportion to the second."""

    def __init__(self, samples: int = 512):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=samples)  # (experts run, tokens, seconds)
        self.per_expert = self.per_token = 0.0

    def observe(self, experts: int, tokens: int, seconds: float) -> None:
        self.samples.append((experts, tokens, seconds))

    def fit(self) -> None:
        if len(self.samples) < 8:
            return
        x = torch.tensor([s[:2] for s in self.samples], dtype=torch.double)
        y = torch.tensor([s[2] for s in self.samples], dtype=torch.double)
        solution = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.flatten()
        if (solution >= 0).all():
            self.per_expert, self.per_token = solution.tolist()
        else:  # a degenerate fit (no spread in the samples): all of it per token
            self.per_expert, self.per_token = 0.0, float(y.sum() / x[:, 1].sum().clamp(min=1))

    def rank_seconds(self, slot_loads: torch.Tensor) -> torch.Tensor:
        """Predicted seconds per rank for one step's tokens per slot [ranks, slots]: a slot with under one
        token per step runs in that share of steps."""
        return self.per_expert * slot_loads.clamp(max=1).sum(1) + self.per_token * slot_loads.sum(1)


def imbalance(rank_loads: torch.Tensor) -> float:
    """max / mean tokens per rank (1.0 is perfect balance)."""
    mean = float(rank_loads.mean())
    return float(rank_loads.max()) / mean if mean > 0 else 1.0


def slots_per_rank(num_experts: int, num_ranks: int, num_redundant: int) -> int:
    total = num_experts + num_redundant
    if total % num_ranks:
        raise ValueError(
            f"{num_experts} experts + {num_redundant} redundant do not split evenly over {num_ranks} ranks"
        )
    return total // num_ranks


def default_placement(num_experts: int, num_ranks: int, num_redundant: int = 0) -> Placement:
    """Experts in order, the redundant slots holding experts 0, 1, ... again."""
    total = slots_per_rank(num_experts, num_ranks, num_redundant) * num_ranks
    return Placement([e % num_experts for e in range(total)], num_experts)


def balanced_placement(expert_load: torch.Tensor, num_ranks: int, num_redundant: int) -> Placement:
    """A placement for `expert_load` [E] (tokens per logical expert over a window)."""
    num_experts = len(expert_load)
    per_rank = slots_per_rank(num_experts, num_ranks, num_redundant)
    load = expert_load.double().tolist()
    copies = [1] * num_experts
    for _ in range(num_redundant):  # at most one copy per rank: a second on the same rank gains nothing
        open_experts = [e for e in range(num_experts) if copies[e] < num_ranks] or range(num_experts)
        hottest = max(open_experts, key=lambda e: load[e] / copies[e])
        copies[hottest] += 1
    pieces = sorted(
        ((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])), key=lambda p: -p[0]
    )
    rank_load, rank_experts = [0.0] * num_ranks, [[] for _ in range(num_ranks)]
    for weight, expert in pieces:
        open_ranks = [r for r in range(num_ranks) if len(rank_experts[r]) < per_rank]
        fresh = [r for r in open_ranks if expert not in rank_experts[r]] or open_ranks
        rank = min(fresh, key=lambda r: rank_load[r])
        rank_load[rank] += weight
        rank_experts[rank].append(expert)
    return Placement([e for experts in rank_experts for e in experts], num_experts)

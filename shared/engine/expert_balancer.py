"""Expert load balancing while serving (EPLB), on rank 0 of an expert-parallel group.

Every `interval_steps` engine steps, each MoE layer's tokens per expert go into a sliding window. A layer
is rebalanced when two things hold:
  - its load has drifted since its placement was chosen: the cosine similarity of the window's load to
    the load that placement was made for is under DRIFT (xLLM's rule; a layer never placed by load counts
    as drifted), and
  - the move pays: the routed tokens the busiest rank sheds under the new placement, times the measured
    seconds per routed token, over one more window of the same load, exceed the measured time to send the
    experts that move.
Moves go one layer per step, between steps: every rank fills a second buffer with its new share, then all
switch (ExpertGroup.move_experts), so serving never stops for more than one layer's move.
"""

import time
from collections import deque
from dataclasses import dataclass, field

import structlog
import torch

from shared.engine.eplb import Placement, balanced_placement, imbalance
from shared.engine.expert_parallel import ExpertGroup, distribute_experts, plan_moves
from shared.engine.moe import SparseMoeBlock

log = structlog.get_logger()

DRIFT = 0.95  # cosine similarity under which a layer's load has drifted from what its placement was made for
WINDOW = 8  # intervals in the sliding window


@dataclass
class LayerBalance:
    block: SparseMoeBlock
    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # tokens per expert, per interval
    placed_for: torch.Tensor | None = None  # the window load the current placement was made for
    imbalance: float = 1.0  # max / mean tokens per rank over the window, under the current placement


class ExpertBalancer:
    def __init__(
        self, group: ExpertGroup, blocks: list[SparseMoeBlock], num_redundant: int, enabled: bool, interval_steps: int
    ):
        self.group, self.num_redundant, self.enabled = group, num_redundant, enabled
        self.interval_steps = interval_steps
        self.layers = [LayerBalance(block) for block in blocks]
        self.queued: deque[tuple[LayerBalance, Placement, torch.Tensor]] = deque()
        self.steps = self.rebalances = 0
        self.move_seconds = 0.0

    def after_step(self) -> None:
        self.steps += 1
        if self.queued:
            self._move(*self.queued.popleft())
        if self.steps % self.interval_steps:
            return
        for layer in self.layers:
            layer.window.append(layer.block.take_load())
            load = torch.stack(list(layer.window)).sum(0)
            layer.imbalance = imbalance(layer.block.placement.rank_loads(load, self.group.world_size))
            if self.enabled and not any(q[0] is layer for q in self.queued):
                placement = self.decide(layer, load)
                if placement is not None:
                    self.queued.append((layer, placement, load))

    def decide(self, layer: LayerBalance, load: torch.Tensor) -> Placement | None:
        """A better placement for `load`, when the layer drifted and moving pays; else None."""
        if not load.any():
            return None
        if (
            layer.placed_for is not None
            and torch.cosine_similarity(load.double(), layer.placed_for.double(), 0) >= DRIFT
        ):
            return None
        ranks, current = self.group.world_size, layer.block.placement
        new = balanced_placement(load, ranks, self.num_redundant)
        shed = float(current.rank_loads(load, ranks).max() - new.rank_loads(load, ranks).max())
        gain_s = shed * self.group.seconds_per_pair
        experts = layer.block.experts
        expert_bytes = (
            experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
        ) * experts.down_proj.element_size()
        cost_s = len(plan_moves(current, new, ranks)) * expert_bytes / max(self.group.bytes_per_second, 1.0)
        if gain_s <= cost_s:
            return None
        return new

    def _move(self, layer: LayerBalance, placement: Placement, load: torch.Tensor) -> None:
        started = time.perf_counter()
        moved = self.group.move_experts(layer.block.layer_index, layer.block.experts, layer.block.placement, placement)
        layer.block.use(placement)
        seconds = time.perf_counter() - started
        layer.placed_for = load
        self.rebalances += 1
        self.move_seconds += seconds
        log.info("experts_rebalanced", layer=layer.block.layer_index, moved_bytes=moved, seconds=round(seconds, 4))

    def stats(self) -> dict:
        return {
            "eplb_rebalances": self.rebalances,
            "eplb_move_seconds": self.move_seconds,
            "eplb_imbalance": {layer.block.layer_index: layer.imbalance for layer in self.layers},
        }

    def close(self) -> None:
        self.group.close()


def start_expert_parallel(model, checkpoint_path: str, config, dtype: torch.dtype) -> ExpertBalancer:
    """The group for this engine (`config`: EngineConfig), rank 0's share of the experts, and its balancer."""
    group = distribute_experts(model, checkpoint_path, config, dtype)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    return ExpertBalancer(group, blocks, config.num_redundant_experts, config.enable_eplb, config.eplb_interval_steps)

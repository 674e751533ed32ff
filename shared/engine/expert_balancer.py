"""Expert load balancing while serving (EPLB), on rank 0 of an expert-parallel group.

Every `interval_steps` engine steps, each MoE layer's tokens per expert go into a sliding window. A layer
is rebalanced when two things hold:
  - its load has drifted since its placement was chosen: the cosine similarity of the window's load to
    the load that placement was made for is under DRIFT (xLLM's rule; a layer never placed by load counts
    as drifted), and
  - the move has paid for itself already: since the drift, the time the slowest rank spent on experts
    beyond what it would have under a balanced placement (eplb.ExpertCost: per expert run + per routed
    token, fitted to rank 0's measured expert time) adds up to more than moving the experts takes
    (measured link speed). How long a skew will last is unknown; this is the ski-rental rule, which
    never spends more than twice what knowing it would have.
Moves go one layer per step, between steps: every rank fills a second buffer with its new share, then all
switch (ExpertGroup.move_experts), so serving never stops for more than one layer's move.

Each move is then checked by its outcome: the layer's measured seconds per routed token across the group
(its slowest rank and the collectives) over the two intervals after the move against the two before. A
move that did not make the layer faster doubles what the layer's next move must have paid for; one that
did halves it again. The cost model sees ranks as independent, and on one host they are not (they share
memory bandwidth): measured on a decode-heavy load, moves that evened out tokens saved nothing
(docs/performance.md §6).
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
CHECK = 2  # intervals compared before and after a move
PAID = 0.98  # a move paid when the layer's seconds per token after it are under this share of before


@dataclass
class LayerBalance:
    block: SparseMoeBlock
    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # tokens per expert, per interval
    placed_for: torch.Tensor | None = None  # the window load the current placement was made for
    regret_s: float = 0.0  # since the load drifted: time a balanced placement would have saved
    imbalance: float = 1.0  # max / mean tokens per rank over the window, under the current placement
    speed: deque = field(default_factory=lambda: deque(maxlen=CHECK))  # seconds per routed token, last intervals
    cost_factor: float = 1.0  # what a move must have paid for, in units of its measured cost
    check: tuple[float, int] | None = None  # after a move: (seconds per token before it, intervals to wait)


class ExpertBalancer:
    def __init__(
        self, group: ExpertGroup, blocks: list[SparseMoeBlock], num_redundant: int, enabled: bool, interval_steps: int
    ):
        self.group, self.num_redundant, self.enabled = group, num_redundant, enabled
        self.interval_steps = interval_steps
        self.layers = [LayerBalance(block) for block in blocks]
        self.queued: deque[tuple[LayerBalance, Placement, torch.Tensor]] = deque()
        self.steps = self.rebalances = self.unpaid = 0
        self.move_seconds = 0.0

    def after_step(self) -> None:
        self.steps += 1
        if self.queued:
            self._move(*self.queued.popleft())
        if self.steps % self.interval_steps:
            return
        self.group.cost.fit()
        for layer in self.layers:
            self._check_outcome(layer, self.group.take_wall(layer.block.layer_index))
            interval_load = layer.block.take_load()
            layer.window.append(interval_load)
            load = torch.stack(list(layer.window)).sum(0)
            layer.imbalance = imbalance(layer.block.placement.rank_loads(load, self.group.world_size))
            if self.enabled and not any(q[0] is layer for q in self.queued):
                placement = self.decide(layer, load, interval_load)
                if placement is not None:
                    self.queued.append((layer, placement, load))

    def decide(self, layer: LayerBalance, load: torch.Tensor, interval_load: torch.Tensor) -> Placement | None:
        """A better placement for `load` (the window's), when the layer drifted and the time lost to its
        imbalance since, `interval_load` included, exceeds the cost of the move; else None."""
        if not load.any():
            return None
        drifted = layer.placed_for is None or cosine(load, layer.placed_for) < DRIFT
        if not drifted:
            layer.regret_s = 0.0
            return None
        ranks, current, cost = self.group.world_size, layer.block.placement, self.group.cost
        new = balanced_placement(load, ranks, self.num_redundant)
        per_step = interval_load.double() / self.interval_steps
        now, then = (cost.rank_seconds(p.slot_loads(per_step, ranks)).max() for p in (current, new))
        layer.regret_s += max(float(now - then), 0.0) * self.interval_steps
        moved_bytes = len(plan_moves(current, new, ranks)) * layer.block.experts.expert_bytes
        cost_s = moved_bytes / max(self.group.bytes_per_second, 1.0)
        return new if layer.regret_s > cost_s * layer.cost_factor else None

    def _check_outcome(self, layer: LayerBalance, seconds_per_token: float | None) -> None:
        if seconds_per_token is None:
            return
        layer.speed.append(seconds_per_token)
        if layer.check is None:
            return
        before, wait = layer.check
        layer.check = (before, wait - 1) if wait > 1 else None
        if layer.check is None:
            paid = sum(layer.speed) / len(layer.speed) < PAID * before
            layer.cost_factor = max(1.0, layer.cost_factor / 2) if paid else layer.cost_factor * 2
            self.unpaid += not paid
            log.info("experts_move_checked", layer=layer.block.layer_index, paid=paid, cost_factor=layer.cost_factor)

    def _move(self, layer: LayerBalance, placement: Placement, load: torch.Tensor) -> None:
        started = time.perf_counter()
        moved = self.group.move_experts(layer.block.layer_index, layer.block.experts, layer.block.placement, placement)
        layer.block.use(placement)
        seconds = time.perf_counter() - started
        layer.placed_for, layer.regret_s = load, 0.0
        if layer.speed:  # the interval the move falls in is mixed: wait it out, then CHECK full ones
            layer.check = (sum(layer.speed) / len(layer.speed), CHECK + 1)
        self.rebalances += 1
        self.move_seconds += seconds
        log.info("experts_rebalanced", layer=layer.block.layer_index, moved_bytes=moved, seconds=round(seconds, 4))

    def stats(self) -> dict:
        return {
            "eplb_rebalances": self.rebalances,
            "eplb_move_seconds": self.move_seconds,
            "eplb_unpaid_moves": self.unpaid,
            "eplb_imbalance": {layer.block.layer_index: layer.imbalance for layer in self.layers},
        }

    def close(self) -> None:
        self.group.close()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.cosine_similarity(a.double(), b.double(), 0))


def start_expert_parallel(model, checkpoint_path: str, config, dtype: torch.dtype) -> ExpertBalancer:
    """The group for this engine (`config`: EngineConfig), rank 0's share of the experts, and its balancer."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    group = distribute_experts(blocks, model.config, checkpoint_path, config, dtype)
    return ExpertBalancer(group, blocks, config.num_redundant_experts, config.enable_eplb, config.eplb_interval_steps)

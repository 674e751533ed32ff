"""Who runs this step: continuous batching under a token budget, chunked prefill, preemption, and a
budget of image tokens to encode (an image is encoded whole when a chunk first reaches it, which stalls the
step: a chunk that would reach one image too many stops just before it).

Each step gives every running sequence the tokens it still needs (one for a decode, a chunk for a
prefill in progress), then admits waiting sequences while the budget and `max_num_seqs` allow.
When blocks run out, the lowest-priority, latest-arrived running sequence is preempted: its blocks
are freed and it goes back to waiting, to be recomputed (the prefix cache usually makes that cheap).

Online work (priority 0) comes first, and offline work (offline jobs) fills the capacity it leaves: an online
sequence at the head of the queue takes the place (the slot, the blocks) of running offline ones at the next
step, which go back to waiting and resume later; beside online work, offline sequences get only what keeps the
step within `offline_slowdown` (a tenth) of the online work's own time, by the engine's step-cost model, so an
offline flood barely moves online TPOT; and alone, offline work makes steps of at most `offline_step_s`, so an
online arrival waits at most that long to take its place (`OfflineMeter`).
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shared.cost_model import CostModel
from shared.engine.block_manager import BlockManager
from shared.engine.multimodal import ImageInput
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.step_budget import token_budget


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose KV this step computes, draft tokens included
    num_draft_tokens: int = 0  # of those, the last are `seq.spec_token_ids`, scored to be verified

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence: its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_draft_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        imported: Callable[[Sequence], bool] = lambda seq: False,
        max_encoder_tokens: int | None = None,
        needs_encoding: Callable[[ImageInput], bool] = lambda image: image.embeds is None,
        step_cost: Callable[[], CostModel | None] = lambda: None,
        offline_slowdown: float = 0.1,
        offline_step_s: float = 0.2,
        step_target_s: float | None = None,
        min_num_batched_tokens: int = 64,
    ):
        self.block_manager = block_manager
        self.max_encoder_tokens = max_encoder_tokens or max_num_batched_tokens  # image tokens encoded a step
        self.needs_encoding = needs_encoding
        self.imported = imported  # whether a sequence's KV was written from outside (a prefill worker's)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_offline_preemptions = 0  # of those, offline sequences that made room for online ones
        self.step_cost = step_cost  # the engine's current step-cost model (None before it has one)
        self.offline_slowdown, self.offline_step_s = offline_slowdown, offline_step_s
        # With a TPOT target each step's budget is what the cost model says fits beside the decodes (step_budget.py).
        self.step_target_s, self.min_num_batched_tokens = step_target_s, min_num_batched_tokens
        self.last_budget = max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        """Queue in (priority, arrival) order: an online request passes queued offline ones."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].sort_key() > seq.sort_key():
            i -= 1
        self.waiting.insert(i, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """Online work first: running online sequences, then waiting online ones (in place of running offline ones
        if need be), then offline sequences, held to what the step can take beside the online work."""
        self.last_budget = token_budget(
            self.step_cost(), self.running, self.step_target_s, self.min_num_batched_tokens, self.max_num_batched_tokens
        )
        self._budget, self._encoding, self._preempted = self.last_budget, 0, False
        self._make_room_for_online()
        self._meter = OfflineMeter.for_step(self, self.step_cost())
        scheduled: list[ScheduledSeq] = []
        running = sorted(self.running, key=Sequence.sort_key)
        online = [seq for seq in running if seq.priority <= 0]
        for seq in online:
            self._continue(seq, scheduled)
        self._admit(scheduled, online_only=True)
        for seq in running[len(online) :]:
            self._continue(seq, scheduled)
        self._admit(scheduled, online_only=False)
        return scheduled

    def _continue(self, seq: Sequence, scheduled: list[ScheduledSeq]) -> None:
        """A running sequence's next tokens (a decode, or a chunk of its prompt), preempting others for blocks."""
        if seq.status != SequenceStatus.RUNNING or self._budget == 0:
            return
        num_new = self._fit_images(seq, min(seq.num_tokens - seq.num_computed_tokens, self._budget))
        num_new = self._meter.allowed(seq, num_new) if num_new else 0
        if num_new == 0:
            return
        num_drafts = self._fit_drafts(seq, num_new, self._budget)
        num_new += num_drafts
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
            victim = max(self.running, key=Sequence.sort_key)
            self._preempt(victim)
            self._preempted = True
            if victim is seq:
                return
        scheduled.append(ScheduledSeq(seq, num_new, num_drafts))
        self._meter.add(seq, num_new)
        self._budget -= num_new

    def _admit(self, scheduled: list[ScheduledSeq], online_only: bool) -> None:
        """Waiting sequences, in order, while the budget, the blocks and `max_num_seqs` allow; none when something
        had to be preempted this step, or we would thrash."""
        while self.waiting and not self._preempted and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if online_only and seq.priority > 0:
                return
            if not seq.block_table:
                self.block_manager.allocate_prefix(seq)
            num_new = self._fit_images(seq, min(seq.num_tokens - seq.num_computed_tokens, self._budget))
            num_new = self._meter.allowed(seq, num_new) if num_new else 0
            if num_new == 0 or not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
                # Hold no cached blocks while waiting, but keep KV imported from a prefill worker (it
                # would be recomputed) unless nothing runs that could free blocks for it.
                if not self.imported(seq) or not self.running:
                    self.block_manager.free(seq)
                return
            self.waiting.popleft()
            self.block_manager.count_lookup(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            self._meter.add(seq, num_new)
            self._budget -= num_new

    def _make_room_for_online(self) -> None:
        """An online sequence at the head of the queue takes the place of running offline ones, latest first: they
        go back to waiting and resume later (recomputed, mostly from the prefix cache)."""
        head = self.waiting[0] if self.waiting else None
        if head is None or head.priority > 0:
            return
        offline = sorted((seq for seq in self.running if seq.priority > 0), key=Sequence.sort_key)
        need = self.block_manager.blocks_needed(head, min(head.num_tokens, self.max_num_batched_tokens))
        while offline and (len(self.running) >= self.max_num_seqs or self.block_manager.num_free_blocks < need):
            self._preempt(offline.pop())
            self.num_offline_preemptions += 1

    def _fit_images(self, seq: Sequence, num_new: int) -> int:
        """The chunk cut just before the first image it would have to encode past this step's encoder budget
        (the step's first image always fits: an image is encoded whole); counts what it encodes."""
        start = seq.num_computed_tokens
        for image in seq.images:  # in prompt order
            if image.offset >= start + num_new:
                break
            if image.offset + image.length <= start or not self.needs_encoding(image):
                continue  # passed, or its embeddings are at hand (an image under way keeps them)
            if self._encoding and self._encoding + image.length > self.max_encoder_tokens:
                return image.offset - start
            self._encoding += image.length
        return num_new

    def _fit_drafts(self, seq: Sequence, num_new: int, budget: int) -> int:
        """Keep as many of a decode's draft tokens as the budget and the free blocks allow, leaving a block
        for each running sequence's next token: speculation never causes a preemption."""
        bm = self.block_manager
        spare_blocks = max(0, bm.num_free_blocks - len(self.running))
        room = (len(seq.block_table) + spare_blocks) * bm.block_size - seq.num_tokens
        seq.spec_token_ids = seq.spec_token_ids[: max(0, min(budget - num_new, room))] if num_new == 1 else []
        return len(seq.spec_token_ids)

    def start(self, seq: Sequence) -> None:
        """Run a sequence whose blocks are already in place (a forked sibling, an imported prefill)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids = []
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED


class OfflineMeter:
    """How much offline work a step may take. Beside online work: as much as keeps the step's predicted time
    within (1 + slowdown) x that of its online work alone. With no online work in it: as much as keeps the step
    within `max_step_s`, so that an online arrival waits at most that long for the step in progress (it takes
    the offline work's place at the next one). A prompt chunk is cut to fit. Without a cost model yet, offline
    sequences take whatever is left, as any sequence does."""

    def __init__(self, model: CostModel | None, slowdown: float, max_step_s: float):
        self.model, self.slowdown, self.max_step_s = model, slowdown, max_step_s
        self.online = [0, 0, 0, 0]  # sequences, tokens, attention, context (shared/cost_model.py)
        self.total = [0, 0, 0, 0]

    @classmethod
    def for_step(cls, scheduler: "Scheduler", model: CostModel | None) -> "OfflineMeter":
        return cls(model, scheduler.offline_slowdown, scheduler.offline_step_s)

    @staticmethod
    def _features(seq: Sequence, num_new: int) -> list[int]:
        if num_new == 1:
            return [1, 1, 0, seq.num_computed_tokens + 1]
        return [1, num_new, num_new * (seq.num_computed_tokens + num_new), 0]

    def allowed(self, seq: Sequence, num_new: int) -> int:
        """The most of the `num_new` tokens `seq` may compute in this step."""
        if self.model is None or seq.priority <= 0:
            return num_new
        limit = (1 + self.slowdown) * self.model.step_seconds(*self.online) if self.online[0] else self.max_step_s

        def fits(n: int) -> bool:
            with_it = [a + b for a, b in zip(self.total, self._features(seq, n))]
            return self.model.step_seconds(*with_it) <= limit

        if fits(num_new):
            return num_new
        low, high = 0, num_new - 1  # the largest n that fits, by bisection (the cost grows with n)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low or (0 if self.total[0] else 1)  # an empty step takes one token: offline work always moves

    def add(self, seq: Sequence, num_new: int) -> None:
        features = self._features(seq, num_new)
        self.total = [a + b for a, b in zip(self.total, features)]
        if seq.priority <= 0:
            self.online = [a + b for a, b in zip(self.online, features)]

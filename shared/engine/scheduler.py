"""Who runs this step: continuous batching under a token budget, chunked prefill, preemption, and a
budget of image tokens to encode (an image is encoded whole when a chunk first reaches it, which stalls the
step: a chunk that would reach one image too many stops just before it).

Each step gives every running sequence the tokens it still needs (one for a decode, a chunk for a
prefill in progress), then admits waiting sequences while the budget and `max_num_seqs` allow.
When blocks run out, the lowest-priority, latest-arrived running sequence is preempted: its blocks
are freed and it goes back to waiting, to be recomputed (the prefix cache usually makes that cheap).
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shared.engine.block_manager import BlockManager
from shared.engine.multimodal import ImageInput
from shared.engine.sequence import Sequence, SequenceStatus


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

    def add(self, seq: Sequence) -> None:
        """Queue in (priority, arrival) order: an online request passes queued offline ones."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].sort_key() > seq.sort_key():
            i -= 1
        self.waiting.insert(i, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        self._encoding = 0  # image tokens this step encodes
        scheduled: list[ScheduledSeq] = []
        preempted = False
        for seq in sorted(self.running, key=Sequence.sort_key):
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = self._fit_images(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if num_new == 0:
                continue
            num_drafts = self._fit_drafts(seq, num_new, budget)
            num_new += num_drafts
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
                victim = max(self.running, key=Sequence.sort_key)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                scheduled.append(ScheduledSeq(seq, num_new, num_drafts))
                budget -= num_new
        # Admit new work only when nothing had to be preempted, or we would thrash.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.allocate_prefix(seq)
            num_new = self._fit_images(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if num_new == 0 or not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
                # Hold no cached blocks while waiting, but keep KV imported from a prefill worker (it
                # would be recomputed) unless nothing runs that could free blocks for it.
                if not self.imported(seq) or not self.running:
                    self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

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

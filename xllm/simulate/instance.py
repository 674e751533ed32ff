"""One simulated engine instance: the real scheduler's batching, priced by the step-cost model, and the heartbeat a
real worker would send.

Each step gives every running decode one token, then every prompt in progress a chunk (in arrival order,
under `max_batched_tokens`), then admits waiting sequences while the budget, `max_num_seqs` and the KV
capacity allow (shared/engine/scheduler.py). It lasts `CostModel.step_seconds` of the features the engine's
own fit uses (shared/engine/load.py): sequences, tokens, sum of chunk x context over prompt chunks, and the
tokens its decodes hold. When the KV is full, the latest-arrived running sequence is preempted and recomputed
later (no prefix cache here: it recomputes everything).

Speed: decodes are kept as a group (a tick counter and the sum of their tokens, not per-sequence updates),
and a stretch of decode-only steps (nothing to admit, no prompt in progress) runs as one event up to the next
finish, priced in closed form; an arrival cuts it at the step then in progress, as the real engine would take
it at its next step. Simplified: decodes always come before prompt chunks in a step (the real order is by
arrival, which differs only after a preemption), KV is counted in tokens (no block rounding), and an imported
sequence's KV counts from when it is admitted.
"""

import heapq
from collections import deque

from shared.cost_model import CostModel
from shared.messages import InstanceInfo
from xllm.simulate.steps import DECODE, DONE, MAX_RUN_STEPS, MIN_STEP_S, PREFILL, WAITING, Seq, Step


class SimInstance:
    """An engine and its worker: `add` queues a sequence, `end_step` applies a finished step and says what
    happened ("first", "done", "handoff"), `begin` starts the next step; `info` is its heartbeat."""

    def __init__(
        self,
        instance_id: str,
        role: str,
        model: CostModel,
        max_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        kv_tokens: int = 131072,
        block_size: int = 16,
        switchable: bool = False,
    ):
        if max_num_seqs > max_batched_tokens:
            raise ValueError("max_num_seqs must not exceed max_batched_tokens (every decode gets its token)")
        self.instance_id, self.role, self.model = instance_id, role, model
        self.roles = ["prefill", "decode"] if switchable else []
        self.max_batched_tokens, self.max_num_seqs = max_batched_tokens, max_num_seqs
        self.kv_tokens, self.block_size = kv_tokens, block_size
        self.cost = model.to_dict()
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []  # running, computing their prompt; in arrival order
        self.decoding: dict[int, Seq] = {}
        self.decode_tokens = 0  # their num_tokens summed: the KV they hold, the slot of their next token included
        self.prefill_kv = 0
        self.tick = 0  # decode steps so far: a decode's generated count is its base + (tick - base_tick)
        self._finishes: list[tuple[int, int, int, Seq]] = []  # (tick it finishes at, rid, epoch, seq)
        self.step: Step | None = None
        self.version = 0  # bumped whenever the end of the current step moves
        self.steps, self.preemptions = 0, 0

    # -- requests -----------------------------------------------------------------------------------

    def add(self, seq: Seq, now: float) -> float | None:
        """Queue `seq`; the time the current step now ends when that has to be (re)scheduled, else None."""
        self._queue(seq)
        st = self.step
        if st is None:
            return self.begin(now)
        if st.k > 1:
            k = min(st.k, st.done_by(now) + 1)  # the step in progress completes, then the new one joins
            if k < st.k:
                st.k = k
                self.version += 1
                return st.end
        return None

    def _queue(self, seq: Seq) -> None:
        seq.state = WAITING
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].rid > seq.rid:
            i -= 1
        self.waiting.insert(i, seq)

    def kv_free(self) -> int:
        return self.kv_tokens - self.decode_tokens - self.prefill_kv

    # -- steps --------------------------------------------------------------------------------------

    def begin(self, now: float) -> float | None:
        """Schedule the next step (or decode-only run) at `now`; its end time, or None when idle."""
        self.version += 1
        before = self.preemptions
        self._fit_kv(0)
        budget = self.max_batched_tokens - len(self.decoding)
        chunks: list[tuple[Seq, int]] = []
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            if seq.state != PREFILL:
                continue  # preempted below for an earlier one's chunk
            n = min(seq.tokens - seq.computed, budget)
            if not self._fit_kv(n, seq):
                continue
            seq.alloc += n
            self.prefill_kv += n
            chunks.append((seq, n))
            budget -= n
        chunks = [(s, n) for s, n in chunks if s.state == PREFILL]
        preempted = self.preemptions > before  # then nothing is admitted this step, or it would thrash
        while self.waiting and not preempted and budget > 0:
            if len(self.prefilling) + len(self.decoding) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if seq.imported:
                if seq.tokens > self.kv_free():
                    break
                self.waiting.popleft()
                self._join_decodes(seq)
                budget -= 1
                continue
            n = min(seq.tokens - seq.computed, budget)
            if n > self.kv_free():
                break
            self.waiting.popleft()
            seq.state, seq.alloc = PREFILL, n
            self.prefill_kv += n
            self.prefilling.append(seq)
            chunks.append((seq, n))
            budget -= n
        b = len(self.decoding)
        if not b and not chunks:
            self.step = None
            return None
        m = self.model
        if chunks:
            attention = sum(n * (s.computed + n) for s, n in chunks)
            tokens = b + sum(n for _, n in chunks)
            seconds = m.step_seconds(b + len(chunks), tokens, attention, self.decode_tokens)
            self.step = Step(now, b, chunks, 1, max(seconds, MIN_STEP_S))
            return self.step.end
        k = 1
        if not preempted:  # decode only, and nothing can join before a finish (or an arrival cuts it)
            while self._finishes and self._finishes[0][3].epoch != self._finishes[0][2]:
                heapq.heappop(self._finishes)
            k = self._finishes[0][0] - self.tick if self._finishes else MAX_RUN_STEPS
            k = max(1, min(k, self.kv_free() // b + 1, MAX_RUN_STEPS))
        c0 = max(m.step_seconds(b, b, 0, self.decode_tokens), MIN_STEP_S)
        self.step = Step(now, b, [], k, c0, m.context * b)
        return self.step.end

    def end_step(self, now: float) -> list[tuple[str, Seq]]:
        """Apply the step that ends now: what happened, in order ("first", "done", "handoff")."""
        st = self.step
        assert st is not None
        self.step = None
        self.steps += st.k
        self.tick += st.k
        self.decode_tokens += st.k * st.decodes
        events: list[tuple[str, Seq]] = []
        while self._finishes and self._finishes[0][0] <= self.tick:
            _, _, epoch, seq = heapq.heappop(self._finishes)
            if seq.state == DECODE and seq.epoch == epoch:
                self._leave_decodes(seq)
                seq.state = DONE
                events.append(("done", seq))
        for seq, n in st.chunks:
            if seq.state != PREFILL:
                continue
            seq.computed += n
            if seq.computed < seq.tokens:
                continue
            self.prefilling.remove(seq)
            self.prefill_kv -= seq.alloc
            seq.alloc = 0
            seq.tokens += 1  # the step samples its next token
            seq.generated += 1
            if seq.generated == 1:
                events.append(("first", seq))
            if seq.handoff or seq.generated >= seq.max_tokens:
                seq.state = DONE
                events.append(("handoff" if seq.handoff else "done", seq))
            else:
                self._join_decodes(seq)
        return events

    def _join_decodes(self, seq: Seq) -> None:
        seq.state, seq.epoch = DECODE, seq.epoch + 1
        seq.base_tick, seq.base_tokens, seq.base_generated = self.tick, seq.tokens, seq.generated
        self.decoding[seq.rid] = seq
        self.decode_tokens += seq.tokens
        heapq.heappush(self._finishes, (self.tick + seq.max_tokens - seq.generated, seq.rid, seq.epoch, seq))

    def _leave_decodes(self, seq: Seq) -> None:
        d = self.tick - seq.base_tick
        seq.tokens, seq.generated = seq.base_tokens + d, seq.base_generated + d
        self.decode_tokens -= seq.tokens
        del self.decoding[seq.rid]

    def _fit_kv(self, need: int, seq: Seq | None = None) -> bool:
        """Preempt the latest-arrived running sequences until `need` more KV tokens fit; False when `seq` had to
        go itself (or nothing is left to preempt)."""
        while self.kv_free() < need:
            running = [*self.prefilling, *self.decoding.values()]
            if not running:
                return False
            victim = max(running, key=lambda s: s.rid)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Seq) -> None:
        if seq.state == DECODE:
            self._leave_decodes(seq)
        else:
            self.prefilling.remove(seq)
            self.prefill_kv -= seq.alloc
        seq.alloc = seq.computed = 0
        seq.epoch += 1
        self.preemptions += 1
        self._queue(seq)

    # -- heartbeat ----------------------------------------------------------------------------------

    def info(self, now: float) -> InstanceInfo:
        """What a real worker's heartbeat would say now (shared/engine/load.py's Load, the engine's stats)."""
        st = self.step
        grown = st.done_by(now) * st.decodes if st is not None and st.k > 1 else 0
        decodes, context = len(self.decoding), self.decode_tokens + grown
        prefill_tokens, prefill_s = 0, 0.0
        for seq in (*self.prefilling, *self.waiting):
            if seq.imported:
                decodes += 1
                context += seq.tokens
                continue
            remaining = seq.tokens - seq.computed
            prefill_tokens += remaining
            prefill_s += self.model.prefill_work(remaining, seq.computed)
        free = max(0, self.kv_free() - grown)
        return InstanceInfo(
            self.instance_id,
            self.role,
            "sim",
            0,
            "sim",
            running=len(self.prefilling) + len(self.decoding),
            waiting=len(self.waiting),
            free_blocks=free // self.block_size,
            total_blocks=self.kv_tokens // self.block_size,
            block_size=self.block_size,
            updated_at=now,
            cost=self.cost,
            load={
                "decode_seqs": decodes,
                "decode_context_tokens": context,
                "prefill_tokens": prefill_tokens,
                "prefill_seconds": prefill_s,
                "max_batched_tokens": self.max_batched_tokens,
            },
            roles=list(self.roles),
        )

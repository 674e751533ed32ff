"""Draft-model speculation: a smaller model with the target's tokenizer runs in the same engine, with its
own paged KV pool, and drafts k tokens per sequence by k forward passes of the drafting batch.

Each target sequence has a draft-side copy (`DraftState.shadow`): the target's tokens, then the drafts of
the last step. Before drafting, the copy is brought back in step with the target: its tokens after their
common prefix (the drafts that were rejected) are dropped, its computed length cut to that prefix and its
blocks past its tokens given back; then one pass computes what the draft model has not seen yet (a new
prompt, the accepted drafts, the target's last token) for every drafting sequence together, and gives the
first draft's logits; k - 1 one-token passes give the others. Each draft token is drawn from q, the
draft's logits put through the very transformations the target's are (penalties over the same history,
logit_bias, min_tokens, temperature, top-k, top-p, min-p; `sampler.py`), and q is kept for verification
(verify.py). Greedy rows take q's argmax and keep no q.

The pool has as many blocks as the target's (each smaller, the draft having fewer layers or heads): the
draft holds what the target holds plus this step's drafts. A sequence's copy is dropped when it finishes
or is preempted; it is recomputed when it resumes.
"""

import time
from dataclasses import dataclass

import torch

from shared.engine.block_manager import BlockManager
from shared.engine.config import ModelConfig
from shared.engine.loader import Checkpoint
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner
from shared.engine.sampler import adjust_logits, probabilities
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.speculative.planner import StepCost
from shared.engine.speculative.verify import normalized
from shared.tokenizer import Tokenizer


@dataclass
class DraftState:
    seq: Sequence  # the target's
    shadow: Sequence  # the draft model's: the target's tokens, then this step's drafts
    synced: int = 0  # shadow.token_ids[:synced] == seq.token_ids[:synced]


def check_same_vocab(target: ModelConfig, tokenizer: Tokenizer, draft: Checkpoint, name: str) -> None:
    """A draft's tokens are the target's only if both map every token to the same id."""
    if draft.config.vocab_size != target.vocab_size:
        raise ValueError(
            f"draft model {name!r} has a vocabulary of {draft.config.vocab_size} tokens and the target "
            f"{target.vocab_size}: a draft model must use the target's tokenizer"
        )
    if draft.tokenizer.tokenizer.get_vocab(with_added_tokens=True) != tokenizer.tokenizer.get_vocab(
        with_added_tokens=True
    ):
        raise ValueError(
            f"draft model {name!r}'s tokenizer maps tokens to other ids than the target's: a draft model must "
            "use the target's tokenizer"
        )


class DraftModel:
    method = "draft"

    def __init__(
        self,
        ckpt: Checkpoint,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_batched_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: list[int],
        keep_blocks: bool = False,
        quantize: str | None = None,
    ):
        self.max_model_len = min(max_model_len, ckpt.config.max_position_embeddings)
        self.model = CausalLM.build(ckpt.config, ckpt.weights, self.max_model_len, device, dtype, keep_blocks, quantize)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, num_blocks, block_size, device, dtype)
        self.max_batched_tokens = max_batched_tokens  # catching up is chunked to this many tokens a step
        self.eos_token_ids = eos_token_ids
        self.states: dict[int, DraftState] = {}  # by the target's seq_id
        self._shadow_of: dict[int, int] = {}  # a shadow's seq_id -> its target's
        self.probs: dict[int, torch.Tensor] = {}  # seq_id -> [k, V]: q of this step's drafts (non-greedy rows)
        self.cost: StepCost | None = None  # seconds of a draft pass by tokens, when draft lengths adapt
        self._pass = (0, 0.0)  # the pass under way: its tokens and when it started

    def propose_batch(self, seqs: list[Sequence], lengths: list[int]) -> None:
        """Set `spec_token_ids` (up to `lengths[i]` tokens) of each sequence, and `probs` of the sampled ones."""
        self.probs.clear()
        for state in [s for s in self.states.values() if s.seq.status != SequenceStatus.RUNNING]:
            self.release(state.seq)  # preempted: recomputed if it comes back
        for seq in seqs:
            seq.spec_token_ids = []
        wanted = {}
        for seq, k in zip(seqs, lengths):
            k = min(k, self.max_model_len - seq.num_tokens)
            if k > 0:
                wanted[seq.seq_id] = k
        catch_up, budget = [], self.max_batched_tokens
        for seq in seqs:
            if seq.seq_id not in wanted or budget <= 0:
                continue
            shadow = self._sync(seq)
            num_new = min(shadow.num_tokens - shadow.num_computed_tokens, budget)
            if self.block_manager.allocate(shadow, shadow.num_computed_tokens + num_new):
                catch_up.append(ScheduledSeq(shadow, num_new))
                budget -= num_new
        logits, shadows = self._run(catch_up)  # only the sequences caught up all the way sample
        drafts: dict[int, list[int]] = {}
        probs: dict[int, list[torch.Tensor]] = {}
        while shadows:
            states = [self.states[self._target_id(shadow)] for shadow in shadows]
            for state, token, q in zip(states, *self._draw(logits, shadows)):
                state.shadow.token_ids.append(token)
                drafts.setdefault(state.seq.seq_id, []).append(token)
                if q is not None:
                    probs.setdefault(state.seq.seq_id, []).append(q)
            self._observe()  # the pass with its draws: what a draft token costs
            going = [s for s in states if len(drafts[s.seq.seq_id]) < wanted[s.seq.seq_id]]
            going = [s for s in going if self.block_manager.allocate(s.shadow, s.shadow.num_tokens)]
            logits, shadows = self._run([ScheduledSeq(s.shadow, 1) for s in going])
        self._observe()  # a catch-up pass of prompt chunks only, which drew nothing
        for seq in seqs:
            seq.spec_token_ids = drafts.get(seq.seq_id, [])
            if seq.seq_id in probs:
                self.probs[seq.seq_id] = torch.stack(probs[seq.seq_id])

    def _sync(self, seq: Sequence) -> Sequence:
        """The sequence's draft-side copy, back in step with it: the drafts the target did not take are
        dropped with their KV, the target's new tokens appended."""
        state = self.states.get(seq.seq_id)
        if state is None:
            shadow = Sequence(seq.request_id, list(seq.token_ids), seq.params)
            shadow.num_prompt_tokens, shadow.generator = seq.num_prompt_tokens, seq.generator
            shadow.status = SequenceStatus.RUNNING
            state = self.states[seq.seq_id] = DraftState(seq, shadow, seq.num_tokens)
            self._shadow_of[shadow.seq_id] = seq.seq_id
            return shadow
        shadow, common = state.shadow, state.synced
        end = min(shadow.num_tokens, seq.num_tokens)
        while common < end and shadow.token_ids[common] == seq.token_ids[common]:
            common += 1
        # the last token is always recomputed: its logits give the first draft
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, common, seq.num_tokens - 1)
        del shadow.token_ids[common:]
        shadow.token_ids += seq.token_ids[common:]
        state.synced = seq.num_tokens
        self.block_manager.trim(shadow)
        return shadow

    def behind(self, seq: Sequence) -> int:
        """Tokens the draft model must compute before it drafts for this sequence (at least its last one)."""
        state = self.states.get(seq.seq_id)
        if state is None:
            return seq.num_tokens
        return max(1, seq.num_tokens - min(state.shadow.num_computed_tokens, state.synced))

    def rollback(self, seq: Sequence) -> None:
        """After verification: give back at once the KV of the drafts the target rejected."""
        if seq.seq_id in self.states and not seq.is_finished:
            self._sync(seq)

    def _run(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, list[Sequence]]:
        self._pass = (sum(s.num_new_tokens for s in batch), time.perf_counter())
        if not batch:
            return torch.empty(0), []
        logits, sampling = self.runner.run(batch)
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens
        return logits, sampling

    def _observe(self) -> None:
        tokens, started = self._pass
        if self.cost is not None and tokens:
            self.cost.observe(tokens, time.perf_counter() - started)

    def _draw(self, logits: torch.Tensor, shadows: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """A draft token per row from q (the argmax for greedy rows, which keep no q)."""
        logits = adjust_logits(logits, shadows, self.eos_token_ids)
        tokens = logits.argmax(dim=-1).tolist()
        qs: list[torch.Tensor | None] = [None] * len(shadows)
        rows = [i for i, shadow in enumerate(shadows) if not shadow.params.greedy]
        if rows:
            q = normalized(probabilities(logits[rows], [shadows[i] for i in rows]))
            for n, i in enumerate(rows):
                tokens[i] = int(torch.multinomial(q[n], 1, generator=shadows[i].generator))
                qs[i] = q[n]
        return tokens, qs

    def _target_id(self, shadow: Sequence) -> int:
        return self._shadow_of[shadow.seq_id]

    def release(self, seq: Sequence) -> None:
        state = self.states.pop(seq.seq_id, None)
        if state is not None:
            self._shadow_of.pop(state.shadow.seq_id, None)
            self.block_manager.free(state.shadow)

    def finished(self, seq: Sequence) -> None:
        self.release(seq)
        self.probs.pop(seq.seq_id, None)

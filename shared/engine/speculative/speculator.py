"""The engine's side of speculative decoding: propose before the schedule, count after verification."""

import time

from shared.engine.block_manager import BlockManager
from shared.engine.config import EngineConfig
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.quant import plan
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.speculative.draft import DraftModel, check_same_vocab
from shared.engine.speculative.ngram import NgramProposer
from shared.engine.speculative.planner import Acceptance, StepCost, plan_draft_lengths
from shared.engine.speculative.suffix import SuffixProposer
from shared.tokenizer import Tokenizer

PROPOSERS = {"ngram": NgramProposer, "suffix": SuffixProposer}
CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Speculator:
    def __init__(
        self, method: str, max_draft_tokens: int, cost: StepCost | None = None, draft: DraftModel | None = None
    ):
        """`cost`: the step-cost model that adapts draft lengths; None drafts all that is proposed. `draft`:
        the draft model of method "draft" (its `cost`, when set, is added to the step's)."""
        if method not in (*PROPOSERS, "draft"):
            raise ValueError(f"unknown speculative method {method!r}: use one of {', '.join(PROPOSERS)}, draft")
        if (method == "draft") != (draft is not None):
            raise ValueError("speculative method 'draft' needs a draft model (--draft-model), and only it")
        self.method = method
        self.draft = draft
        self.proposer = draft or PROPOSERS[method]()
        self.max_draft_tokens = max_draft_tokens
        self.cost = cost
        self.acceptance = Acceptance()
        self.drafted = 0  # draft tokens scored
        self.accepted = 0  # of those, emitted
        self.verifications = 0  # sequence-steps that scored drafts

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        max_model_len: int,
        runner: ModelRunner,
        block_manager: BlockManager,
        tokenizer: Tokenizer,
        eos_token_ids: list[int],
    ) -> "Speculator | None":
        """The speculator an engine's config asks for: none, one drafting all that is proposed, or one whose
        draft lengths adapt, calibrated on the most tokens a step of this engine can hold."""
        if config.speculative == "none":
            return None
        draft = None
        if config.speculative == "draft":  # EngineConfig made sure there is a draft model
            draft = draft_model(config, max_model_len, runner, block_manager, tokenizer, eos_token_ids)
        if config.draft_length == "fixed":
            return cls(config.speculative, config.num_speculative_tokens, draft=draft)
        max_tokens = min(
            config.max_num_batched_tokens,
            block_manager.num_blocks * config.block_size,
            max_model_len,
            config.max_num_seqs * (config.num_speculative_tokens + 1),
        )
        if draft is not None:  # its passes have a row per drafting sequence
            draft.cost = measure_cost(draft.runner, draft.block_manager, min(max_tokens, config.max_num_seqs))
        cost = measure_cost(runner, block_manager, max_tokens)
        return cls(config.speculative, config.num_speculative_tokens, cost, draft)

    def propose(self, running: list[Sequence], waiting: list[Sequence], budget: int, max_model_len: int) -> None:
        """Set `spec_token_ids` of the running sequences that decode this step."""
        decodes, prefill_tokens = [], sum(s.num_tokens - s.num_computed_tokens for s in waiting)
        for seq in running:
            if seq.status == SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens - 1:
                decodes.append(seq)
            else:
                prefill_tokens += seq.num_tokens - seq.num_computed_tokens
        limits = []
        for seq in decodes:
            k = min(self.max_draft_tokens, max_model_len - seq.num_tokens - 1)
            if seq.params.max_tokens is not None:
                k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
            limits.append(max(k, 0))
        base_tokens = min(budget, len(decodes) + prefill_tokens)  # what the step scores without drafts
        if self.draft is not None:  # drafting costs draft passes: plan first, then draft what pays
            catch_up = [self.draft.behind(seq) for seq in decodes]
            lengths = self._plan(decodes, limits, len(decodes), base_tokens, catch_up)
            self.draft.propose_batch(decodes, lengths)
            return
        candidates = []
        for seq, k in zip(decodes, limits):
            seq.spec_token_ids = self.proposer.propose(seq, k) if k > 0 else []
            if seq.spec_token_ids:
                candidates.append(seq)
        lengths = self._plan(candidates, [len(s.spec_token_ids) for s in candidates], len(decodes), base_tokens)
        for seq, length in zip(candidates, lengths):
            seq.spec_token_ids = seq.spec_token_ids[:length]

    def _plan(
        self,
        seqs: list[Sequence],
        available: list[int],
        num_decodes: int,
        base_tokens: int,
        catch_up: list[int] | None = None,
    ) -> list[int]:
        """Draft lengths that pay, by the cost model; all that is available without one."""
        if self.cost is None or not seqs:
            return available
        acceptance = [self.acceptance.of(s.seq_id) for s in seqs]
        draft_cost = self.draft.cost if self.draft is not None else None
        lengths = plan_draft_lengths(available, acceptance, num_decodes, base_tokens, self.cost, draft_cost, catch_up)
        for seq, k, length in zip(seqs, available, lengths):
            if k and not length:
                self.acceptance.idle(seq.seq_id)
        return lengths

    def observe_step(self, tokens: int, started: float) -> None:
        if self.cost is not None:
            self.cost.observe(tokens, time.perf_counter() - started)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.acceptance.record(seq.seq_id, drafted, accepted)
        if self.draft is not None:
            self.draft.rollback(seq)
        self.drafted += drafted
        self.accepted += accepted
        self.verifications += 1

    def finished(self, seq: Sequence) -> None:
        self.proposer.finished(seq)
        self.acceptance.forget(seq.seq_id)

    def stats(self) -> dict:
        return {
            "spec_drafted_tokens": self.drafted,
            "spec_accepted_tokens": self.accepted,
            "spec_verifications": self.verifications,
        }


def draft_model(
    config: EngineConfig,
    max_model_len: int,
    runner: ModelRunner,
    block_manager: BlockManager,
    tokenizer: Tokenizer,
    eos_token_ids: list[int],
) -> DraftModel:
    """`config.draft_model` loaded beside the target, in the same --quantization, refused unless it shares the
    target's vocabulary; its KV pool has as many blocks as the target's."""
    keep_blocks, quantize = plan(config.quantization, runner.device, runner.k_cache.dtype)
    ckpt = load_checkpoint(config.draft_model, keep_blocks=keep_blocks)
    check_same_vocab(runner.model.config, tokenizer, ckpt, config.draft_model)
    return DraftModel(
        ckpt,
        block_manager.num_blocks,
        block_manager.block_size,
        max_model_len,
        config.max_num_batched_tokens,
        runner.device,
        runner.k_cache.dtype,
        eos_token_ids,
        keep_blocks,
        quantize,
    )


def measure_cost(runner: ModelRunner, block_manager: BlockManager, max_tokens: int) -> StepCost:
    """A model's step time at a few token counts, up to `max_tokens`, measured before the engine serves."""
    sizes = [n for n in CALIBRATION_SIZES if n <= max_tokens] or [1]
    time_step(runner, block_manager, sizes[-1])  # warm up
    points = {n: min(time_step(runner, block_manager, n) for _ in range(2)) for n in sizes}
    if len(points) == 1:
        points[2 * sizes[0]] = 2 * points[sizes[0]]
    return StepCost(points)


def time_step(runner: ModelRunner, block_manager: BlockManager, num_tokens: int) -> float:
    """Seconds for one forward of `num_tokens` tokens of a throwaway sequence, its blocks freed after."""
    seq = Sequence("calibration", [0] * num_tokens, SamplingParams(max_tokens=1))
    block_manager.allocate(seq, num_tokens)
    started = time.perf_counter()
    runner.run([ScheduledSeq(seq, num_tokens)])
    elapsed = time.perf_counter() - started
    block_manager.free(seq)
    return elapsed

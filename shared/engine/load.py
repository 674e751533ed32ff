"""What an engine measures of its own steps and reports of its load, for the router's TTFT and TPOT
predictions (shared/cost_model.py): a StepSample per step, and the work queued ahead of a new request.

Both are computed on the engine thread, at the end of a step; the worker's heartbeat only reads them.
"""

from dataclasses import dataclass

from shared.cost_model import CostModel, StepCosts, StepSample, load_profile
from shared.engine.scheduler import ScheduledSeq, Scheduler


def step_sample(batch: list[ScheduledSeq]) -> StepSample:
    """The step's features, before its tokens count as computed; seconds filled in when it is done."""
    attention = context = 0
    for s in batch:
        if s.num_new_tokens == 1:  # a decode: it reads the KV it holds
            context += s.seq.num_computed_tokens + 1
        else:  # a prompt chunk, or a decode with draft tokens to verify
            attention += s.num_new_tokens * (s.seq.num_computed_tokens + s.num_new_tokens)
    return StepSample(len(batch), sum(s.num_new_tokens for s in batch), attention, context, 0.0)


@dataclass
class Load:
    """Decoding: sequences and the tokens they hold. Prefilling (running or waiting): prompt tokens still to
    compute, and the seconds of step work they add by the cost model (0 before it is fitted)."""

    decode_seqs: int = 0
    decode_context_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0

    @classmethod
    def of(cls, scheduler: Scheduler, model: CostModel | None) -> "Load":
        load = cls()
        for seq in [*scheduler.running, *scheduler.waiting]:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining <= 1 and seq.num_computed_tokens:
                load.decode_seqs += 1
                load.decode_context_tokens += seq.num_tokens
            else:
                load.prefill_tokens += remaining
                if model is not None:
                    load.prefill_seconds += model.prefill_work(remaining, seq.num_computed_tokens)
        return load


def step_costs(profile: str | None) -> StepCosts:
    """The online fit, seeded with a profile's samples when the engine was given one."""
    return StepCosts(load_profile(profile)[0] if profile else None)

"""The token budget of each step under a TPOT target (`--step-slo-ms`): as the measured step costs drift, each
step gets the most tokens the engine's current step-cost model (shared/cost_model.py) predicts keep it within the
target, beside the decodes already running, so a prompt chunk riding in a step never stretches the running
sequences' time per output token past it. Never below `floor` (prompts always move on; the decodes running take
their token each whatever the model says) and never above the configured `max_num_batched_tokens`. Without a
target, or before the engine has a cost model, every step gets the configured budget, as before.

A chunk's prompt attention is priced as a fresh prompt's (n tokens x n): the scheduler picks the chunks after
the budget is set, and a later chunk of a long prompt costs more only through its context, which the fit's
attention term prices when it is measured.
"""

from collections.abc import Iterable

from shared.cost_model import CostModel
from shared.engine.sequence import Sequence


def decoding(running: Iterable[Sequence]) -> tuple[int, int]:
    """Running sequences that decode this step (one token each) and the tokens they hold in all."""
    seqs = context = 0
    for seq in running:
        if seq.num_computed_tokens and seq.num_tokens - seq.num_computed_tokens <= 1:
            seqs += 1
            context += seq.num_tokens
    return seqs, context


def prefill_room(model: CostModel, decode_seqs: int, decode_context: int, target_s: float, most: int) -> int:
    """The most prompt tokens (<= `most`) one step may add to `decode_seqs` decodes holding `decode_context` tokens
    and stay within `target_s` by `model`; 0 when even one does not fit."""

    def seconds(n: int) -> float:
        return model.step_seconds(decode_seqs + (n > 0), decode_seqs + n, n * n, decode_context)

    if seconds(most) <= target_s:
        return most
    low, high = 0, most - 1  # the largest n that fits, by bisection (the cost grows with n)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if seconds(mid) <= target_s else (low, mid - 1)
    return low if seconds(low) <= target_s else 0


def token_budget(
    model: CostModel | None, running: Iterable[Sequence], target_s: float | None, floor: int, ceiling: int
) -> int:
    """This step's token budget: `ceiling` without a target or a model; else the running decodes plus the prompt
    tokens that fit beside them within `target_s`, clamped to [max(floor, decodes), ceiling]."""
    if target_s is None or model is None:
        return ceiling
    seqs, context = decoding(running)
    room = prefill_room(model, seqs, context, target_s, max(0, ceiling - seqs))
    return min(ceiling, max(floor, seqs + room, seqs))

"""Verification of draft tokens, by one of two exact rules.

Drafts without probabilities (n-gram, suffix; and a draft model's greedy rows), `verify_by_sampling`:
sample each position as without speculation and go on while the token sampled equals the draft there.
The draft d is kept with the target's probability of it, and where it is not the token is the target's
distribution without d; every position is sampled with the same penalties, history and generator draws
as without speculation, so greedy and seeded outputs do not change.

Drafts a draft model sampled, with their probabilities, `verify_with_probs`: standard speculative
sampling (Leviathan et al. 2023; vLLM's rejection sampler). At each draft position the target's p and
the draft's q are both the distributions the sampler would draw from (penalties, logit_bias, min_tokens,
temperature, top-k, top-p, min-p, over the same history). The draft token d is accepted with probability
min(1, p(d) / q(d)); where it is not, the token is drawn from norm(max(0, p - q)); after k accepted drafts
the next token is drawn from p. Each emitted token is then distributed exactly as p. Every draw of a
seeded sequence comes from its own generator, so its output does not depend on the rest of the batch
(but, unlike the first rule's, it does on the drafts: the same seed gives another sample than without
speculation, from the same distribution).

Greedy rows are verified by the first rule, which for one-hot p and q is this one.
"""

from collections.abc import Callable

import torch

from shared.engine.sampler import TopLogprobs, adjust_logits, probabilities, sample, token_logprobs
from shared.engine.sequence import Sequence

Logprob = tuple[float, TopLogprobs] | None
Append = Callable[[Sequence, int, Logprob], None]


def normalized(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=-1, keepdim=True)


def target_probs(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> torch.Tensor:
    """The distribution each (non-greedy) row's next token is sampled from, normalized."""
    return normalized(probabilities(adjust_logits(logits, seqs, eos_token_ids), seqs))


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], seqs: list[Sequence]
) -> tuple[list[int], list[bool]]:
    """Per row: the draft token and True with probability min(1, p(d)/q(d)), else a token from
    norm(max(0, p - q)) and False. p and q: [N, V], normalized."""
    tokens, accepted = [], []
    for row, (seq, draft) in enumerate(zip(seqs, drafts)):
        u = torch.rand((), generator=seq.generator, device=p.device)
        p_d, q_d = p[row, draft], q[row, draft]
        if u * q_d <= p_d:  # u < p/q without dividing by a q(d) that rounding made 0
            tokens.append(draft)
            accepted.append(True)
            continue
        residual = (p[row] - q[row]).clamp(min=0)
        if residual.sum() <= 0:  # p == q up to rounding: a rejection is then p's own draw
            residual = p[row]
        tokens.append(int(torch.multinomial(residual, 1, generator=seq.generator)))
        accepted.append(False)
    return tokens, accepted


def verify_by_sampling(
    seqs: list[Sequence], draft_logits: dict[int, torch.Tensor], eos_token_ids: list[int], append: Append
) -> dict[Sequence, int]:
    """`seqs` have sampled their first position (the last token of each is that sample): emit the token
    after each draft the sample equalled; returns the drafts accepted per sequence."""
    accepted = dict.fromkeys(seqs, 0)
    active, position = seqs, 0
    while active := [
        seq
        for seq in active
        if not seq.finish_reason
        and position < len(seq.spec_token_ids)
        and seq.token_ids[-1] == seq.spec_token_ids[position]
    ]:
        position += 1
        for seq in active:
            accepted[seq] += 1
        rows = torch.stack([draft_logits[seq.seq_id][position - 1] for seq in active])
        sampled = sample(rows, active, eos_token_ids)
        for seq, token, logprob in zip(active, sampled.token_ids, sampled.logprobs):
            append(seq, token, logprob)
    return accepted


def verify_with_probs(
    seqs: list[Sequence],
    first_logits: torch.Tensor,
    draft_logits: dict[int, torch.Tensor],
    draft_probs: dict[int, torch.Tensor],
    eos_token_ids: list[int],
    append: Append,
) -> dict[Sequence, int]:
    """Emit each sequence's accepted drafts and the token after them through `append` (which appends to
    `seq.token_ids` and may finish it); returns the drafts accepted per sequence.

    first_logits: [N, V], the target's logits at each sequence's first draft position; draft_logits[seq_id]:
    [k, V], at the positions after each draft token; draft_probs[seq_id]: [k, V], the draft's q there."""
    accepted = dict.fromkeys(seqs, 0)
    active, position = list(range(len(seqs))), 0
    while active:
        rows = torch.stack(
            [first_logits[i] if position == 0 else draft_logits[seqs[i].seq_id][position - 1] for i in active]
        )
        group = [seqs[i] for i in active]
        want_logprobs = any(seq.params.logprobs is not None for seq in group)
        raw_logprobs = torch.log_softmax(rows, dim=-1) if want_logprobs else None
        drafting = [n for n, seq in enumerate(group) if position < len(seq.spec_token_ids)]
        tokens, ok = [0] * len(group), [False] * len(group)
        if drafting:
            sub = [group[n] for n in drafting]
            p = target_probs(rows[drafting].clone(), sub, eos_token_ids)
            q = torch.stack([draft_probs[seq.seq_id][position] for seq in sub])
            drafts = [seq.spec_token_ids[position] for seq in sub]
            for n, token, kept in zip(drafting, *accept_or_resample(p, q, drafts, sub)):
                tokens[n], ok[n] = token, kept
        bonus = [n for n in range(len(group)) if n not in set(drafting)]
        if bonus:  # every draft accepted: the next token is p's own draw
            for n, token in zip(bonus, sample(rows[bonus].clone(), [group[n] for n in bonus], eos_token_ids).token_ids):
                tokens[n] = token
        logprobs = token_logprobs(raw_logprobs, group, tokens)
        next_active = []
        for n, i in enumerate(active):
            seq = seqs[i]
            append(seq, tokens[n], logprobs[n])
            if ok[n]:
                accepted[seq] += 1
                if not seq.finish_reason:
                    next_active.append(i)
        active, position = next_active, position + 1
    return accepted

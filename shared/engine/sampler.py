"""Turn a step's logits into tokens, with the OpenAI / vLLM sampling parameters of each row.

Order (as in vLLM): logprobs of the raw model distribution; penalties; logit_bias; min_tokens; then
greedy rows take the argmax, the others are scaled by temperature, filtered by top-k, top-p and min-p,
and sampled with the exponential-race trick, where seeded rows draw their noise from their own
generator so their output does not depend on what else is in the batch.
"""

from dataclasses import dataclass

import torch

from shared.engine.sequence import Sequence

TopLogprobs = list[tuple[int, float]]


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[tuple[float, TopLogprobs] | None]  # per row, when the row asked for logprobs


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> SampleOutput:
    """logits: [N, V] float32, one row per sequence in `seqs`."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    logits = adjust_logits(logits, seqs, eos_token_ids)
    greedy = torch.tensor([s.params.greedy for s in seqs])
    tokens = logits.argmax(dim=-1)
    if not greedy.all():
        rows = (~greedy).nonzero().squeeze(1)
        sampled_seqs = [seqs[i] for i in rows.tolist()]
        tokens[rows] = _race(probabilities(logits[rows], sampled_seqs), sampled_seqs)
    token_list = tokens.tolist()
    return SampleOutput(token_list, token_logprobs(raw_logprobs, seqs, token_list))


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> torch.Tensor:
    """Penalties, logit_bias, and min_tokens' ban on stop ids and EOS: what every row gets before it is
    sampled, greedy or not."""
    logits = apply_logit_bias(apply_penalties(logits, seqs), seqs)
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else eos_token_ids)
            logits[row, banned] = float("-inf")
    return logits


def token_logprobs(
    raw_logprobs: torch.Tensor | None, seqs: list[Sequence], tokens: list[int]
) -> list[tuple[float, TopLogprobs] | None]:
    """Each row's logprob of its token and its top logprobs, for the rows that asked (None for the others)."""
    out: list[tuple[float, TopLogprobs] | None] = [None] * len(seqs)
    for row, seq in enumerate(seqs):
        if seq.params.logprobs is not None:
            lp = raw_logprobs[row]
            top: TopLogprobs = []
            if seq.params.logprobs:
                values, ids = lp.topk(seq.params.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            out[row] = (lp[tokens[row]].item(), top)
    return out


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output (HF/vLLM); presence and frequency over the output."""
    rows = [i for i, s in enumerate(seqs) if _has_penalty(s)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for row in rows:
        p = seqs[row].params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seqs[row].token_ids)), dtype=torch.long)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        output = seqs[row].output_token_ids
        if output and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Add each row's logit_bias to its logits (a copy: the caller's tensor is left as it was)."""
    rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for row in rows:
        # the gateway refuses ids outside the vocabulary; skipping them here keeps a direct engine
        # caller's bad id from failing the whole batch's step with an IndexError
        bias = {t: b for t, b in seqs[row].params.logit_bias.items() if 0 <= t < vocab}
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        logits[row, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def _has_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def probabilities(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The distribution a non-greedy row is sampled from: adjusted logits scaled by temperature, filtered by
    top-k, top-p and min-p: zeros where filtered, and not renormalized after top-p or min-p (the race
    does not need it; whoever needs probabilities divides by the row's sum)."""
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
    logits = logits / temps.unsqueeze(1)
    top_k = torch.tensor([s.params.top_k for s in seqs])
    if (top_k > 0).any():
        vocab = logits.shape[1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=probs.dtype)
    if (top_p < 1).any():
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=probs.dtype)
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _race(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row drawn from `probs` (unnormalized is fine) by the exponential race."""
    noise = torch.empty_like(probs)
    for row, seq in enumerate(seqs):
        noise[row].exponential_(generator=seq.generator)
    return (probs / noise).argmax(dim=-1)

"""What `xllm tune` chooses and why: a model of serving throughput, TPOT and memory from the fitted step-cost
model (shared/cost_model.py) and the bytes the engine needs. Pure: no torch, no engine, tested by shaping costs.

A workload of requests of P prompt and O output tokens, served with B sequences running at once (the queue is
never empty: a throughput run). In steady state every step decodes the B sequences, whose context averages
P + O/2 tokens each, and B/O requests finish a step, so B/O prompts' prefill rides along per step on average:

    mean step  t(B) = c_step + (c_seq + c_token) B + c_context B (P + O/2) + (B/O) prefill(P')
    TPOT = t(B),  throughput = B / t(B) output tokens a second,

prefill(P') priced chunk by chunk (c_seq + c_token n + c_attention n (context + n) a chunk of n), P' the prompt
tokens not found in the prefix cache. The per-step token budget T is the largest that keeps a step with a full
prompt chunk beside the B decodes within the TPOT target (the rule the engine applies online under
--step-slo-ms: shared/engine/step_budget.py), and it must take the prefill the steady state asks for,
(B/O) P' <= T - B. Memory, out of the `--memory` budget: the weights, activations (per batched token, plus
each sampled sequence's logits) and the KV pool, which must hold the B running sequences whole (else they are
preempted); what is left enlarges the pool for shared prefixes. Those of the shared prefixes that do not fit go
to the second KV tier, out of its own allowance (host memory on CUDA, a memory-mapped file on a CPU host), when
bringing a block up costs less than recomputing it, and prefix hits shorten P'.

Throughput B / (a + b B) grows with B, so the choice is the largest B that the TPOT target, the memory and the
prefill demand allow; which of them stops B is the constraint that binds, and the explanation says so.
"""

import math
from dataclasses import dataclass, field

from shared.cost_model import CostModel
from shared.engine.step_budget import prefill_room


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    output_len: int
    tpot_slo_s: float
    shared_prefix_len: int = 0  # tokens of a prompt that are one of `num_prefixes` shared prefixes
    num_prefixes: int = 0  # distinct shared prefixes, equally popular


@dataclass(frozen=True)
class Memory:
    budget: int  # bytes for the weights, activations and the KV pool
    weights: int
    kv_per_token: int
    act_per_token: int  # activations per token batched in a step
    act_per_seq: int  # per sequence sampled in a step (its logits)
    block_size: int = 16
    host_allowance: int = 0  # the most bytes the second KV tier may take (0: no tier)
    swap_in_s_per_block: float = math.inf  # seconds to bring a block up from the tier


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    min_num_batched_tokens: int = 64


@dataclass
class Prediction:
    max_num_seqs: int
    max_num_batched_tokens: int
    tpot_s: float  # mean step seconds
    worst_step_s: float  # a step with a full prompt chunk beside the decodes
    throughput: float  # output tokens a second
    prefill_demand: float  # prompt tokens a step the steady state asks for
    kv_device: int  # bytes of the KV pool
    kv_host: int  # bytes of the second tier
    activations: int
    prefix_hit: float  # fraction of shared-prefix tokens found cached

    def feasible(self, slo_s: float) -> bool:
        return self.tpot_s <= slo_s and self.prefill_demand <= self.max_num_batched_tokens - self.max_num_seqs


@dataclass
class Choice:
    best: Prediction
    binds: str  # "tpot", "memory", "prefill", "max_num_seqs" or "none" (the target cannot be met)
    explanation: str
    predictions: list[Prediction] = field(default_factory=list, repr=False)  # every B that fits in memory


def blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def prefill_seconds(cost: CostModel, tokens: int, context: int, chunk: int) -> float:
    """Step seconds a prompt of `tokens` new tokens after `context` cached ones adds, in chunks of `chunk`."""
    seconds, done = 0.0, 0
    while done < tokens:
        n = min(chunk, tokens - done)
        seconds += cost.seq + cost.prefill_work(n, context + done)
        done += n
    return seconds


def predict(cost: CostModel, memory: Memory, work: Workload, seqs: int, limits: Limits) -> Prediction | None:
    """The model at B = `seqs`; None when the memory cannot hold B running sequences."""
    p, o, bs = work.prompt_len, work.output_len, memory.block_size
    context = seqs * (p + o // 2)  # the decodes' context, on average
    room = prefill_room(cost, seqs, context, work.tpot_slo_s, max(0, limits.max_num_batched_tokens - seqs))
    budget = min(limits.max_num_batched_tokens, max(limits.min_num_batched_tokens, seqs + room))
    activations = memory.act_per_token * budget + memory.act_per_seq * seqs
    running = seqs * blocks(p + o, bs) * bs * memory.kv_per_token
    spare = memory.budget - memory.weights - activations - running
    if spare < 0:
        return None
    prefix_bytes = work.num_prefixes * blocks(work.shared_prefix_len, bs) * bs * memory.kv_per_token
    on_device = min(spare, prefix_bytes)
    recompute_block = cost.prefill_work(bs, work.shared_prefix_len // 2)
    pays = memory.swap_in_s_per_block < recompute_block
    host = min(memory.host_allowance, prefix_bytes - on_device) if pays else 0
    hit = (on_device + host) / prefix_bytes if prefix_bytes else 0.0
    cached = int(hit * work.shared_prefix_len)
    swap_in = host / prefix_bytes * blocks(work.shared_prefix_len, bs) * memory.swap_in_s_per_block if host else 0.0
    new_tokens = p - cached
    per_request = prefill_seconds(cost, new_tokens, cached, max(1, budget - seqs)) + swap_in
    step = cost.decode_step(seqs, context) + seqs / o * per_request
    chunk = max(0, min(budget - seqs, new_tokens))
    worst = cost.step_seconds(seqs + (chunk > 0), seqs + chunk, chunk * chunk, context)
    return Prediction(
        seqs, budget, step, worst, seqs / step, seqs / o * new_tokens, running + spare, host, activations, hit
    )


def choose(cost: CostModel, memory: Memory, work: Workload, limits: Limits = Limits()) -> Choice:
    """The B (and its T, memory split) of highest predicted throughput under the TPOT target; why B stops there."""
    predictions: list[Prediction] = []
    for seqs in range(1, limits.max_num_seqs + 1):
        prediction = predict(cost, memory, work, seqs, limits)
        if prediction is None:
            break  # more sequences need more memory still
        predictions.append(prediction)
    if not predictions:
        one = blocks(work.prompt_len + work.output_len, memory.block_size) * memory.block_size * memory.kv_per_token
        need = (memory.weights + one) >> 20
        raise ValueError(f"--memory {memory.budget >> 20} MiB cannot hold the weights and one sequence ({need} MiB+)")
    feasible = [pr for pr in predictions if pr.feasible(work.tpot_slo_s)]
    if not feasible:
        best = predictions[0]
        why = f"even one sequence is predicted at {best.tpot_s * 1e3:.1f} ms a token: the TPOT target cannot be met"
        return Choice(best, "none", why, predictions)
    best = max(feasible, key=lambda pr: (round(pr.throughput, 6), -pr.max_num_seqs))
    after = next((pr for pr in predictions if pr.max_num_seqs == best.max_num_seqs + 1), None)
    if best.max_num_seqs == limits.max_num_seqs:
        binds, why = "max_num_seqs", f"B stops at the limit of {limits.max_num_seqs} sequences"
    elif after is None:
        binds = "memory"
        why = f"memory: {best.max_num_seqs + 1} running sequences' KV would not fit in the budget"
    elif after.tpot_s > work.tpot_slo_s:
        binds = "tpot"
        why = f"TPOT: {after.max_num_seqs} sequences are predicted at {after.tpot_s * 1e3:.1f} ms a token"
    elif not after.feasible(work.tpot_slo_s):
        binds = "prefill"
        why = f"prefill: {after.max_num_seqs} sequences ask for more prompt tokens a step than the budget holds"
    else:
        binds, why = "throughput", "more sequences are predicted to lower throughput"
    return Choice(best, binds, why, predictions)

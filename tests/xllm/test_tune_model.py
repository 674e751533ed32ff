"""The tuner's choice follows its model (xllm/tune/model.py): shape the costs and the memory so that the TPOT
target binds, then the memory, and the choice and its reason flip."""

import math

import pytest

from shared.cost_model import CostModel
from xllm.tune.model import Limits, Memory, Workload, choose, predict

MIB = 1 << 20
COST = CostModel(step=0.004, seq=0.0005, token=0.0002, attention=2e-8, context=2e-6)
WORK = Workload(prompt_len=128, output_len=64, tpot_slo_s=0.05)
KV = 46080  # bytes a token of SmolLM2-135M's KV in fp32


def memory(budget_mib: int, **kw) -> Memory:
    return Memory(budget_mib * MIB, 540 * MIB, KV, act_per_token=40_000, act_per_seq=200_000, **kw)


def test_with_room_to_spare_the_tpot_target_binds_and_b_is_the_largest_within_it():
    choice = choose(COST, memory(8192), WORK)
    b = choice.best.max_num_seqs
    assert choice.binds == "tpot" and "TPOT" in choice.explanation
    assert choice.best.tpot_s <= WORK.tpot_slo_s < predict(COST, memory(8192), WORK, b + 1, Limits()).tpot_s


def test_a_small_budget_makes_memory_bind_and_b_fit_the_kv():
    roomy = choose(COST, memory(8192), WORK).best.max_num_seqs
    choice = choose(COST, memory(700), WORK)
    assert choice.binds == "memory" and choice.best.max_num_seqs < roomy
    per_seq = 12 * 16 * KV  # 192 tokens: 12 blocks
    assert choice.best.kv_device >= choice.best.max_num_seqs * per_seq
    used = 540 * MIB + choice.best.activations + choice.best.kv_device
    assert used <= 700 * MIB < used + per_seq  # the split spends the budget, and one more sequence would not fit


def test_a_looser_target_or_cheaper_steps_allow_more_sequences():
    base = choose(COST, memory(8192), WORK).best.max_num_seqs
    loose = Workload(128, 64, tpot_slo_s=0.1)
    assert choose(COST, memory(8192), loose).best.max_num_seqs > base
    cheaper = CostModel(step=0.004, seq=0.0005, token=0.0002, attention=2e-8, context=0.5e-6)
    assert choose(cheaper, memory(8192), WORK).best.max_num_seqs > base


def test_the_token_budget_is_what_keeps_a_chunked_step_within_the_target():
    best = choose(COST, memory(8192), WORK).best
    assert best.worst_step_s <= WORK.tpot_slo_s
    slow_prefill = CostModel(step=0.004, seq=0.0005, token=0.0006, attention=2e-8, context=2e-6)
    assert choose(slow_prefill, memory(8192), Workload(128, 64, 0.2)).best.max_num_batched_tokens < 8192


def test_an_unreachable_target_says_so_and_falls_back_to_one_sequence():
    choice = choose(COST, memory(8192), Workload(128, 64, tpot_slo_s=0.001))
    assert choice.binds == "none" and choice.best.max_num_seqs == 1 and "cannot be met" in choice.explanation


def test_the_limit_on_sequences_binds_when_nothing_else_does():
    choice = choose(COST, memory(8192), Workload(128, 64, 10.0), Limits(max_num_seqs=16))
    assert choice.binds == "max_num_seqs" and choice.best.max_num_seqs == 16


def test_no_budget_for_even_one_sequence_is_an_error():
    with pytest.raises(ValueError, match="cannot hold"):
        choose(COST, memory(541), WORK)


def test_shared_prefixes_that_overflow_the_pool_go_to_the_tier_only_when_copies_beat_recomputing():
    work = Workload(512, 64, 0.2, shared_prefix_len=448, num_prefixes=200)  # ~4 GiB of prefixes
    cheap_copy = choose(COST, memory(1200, host_allowance=2048 * MIB, swap_in_s_per_block=1e-6), work).best
    costly_copy = choose(COST, memory(1200, host_allowance=2048 * MIB, swap_in_s_per_block=1.0), work).best
    none = choose(COST, memory(1200, swap_in_s_per_block=1e-6), work).best
    assert cheap_copy.kv_host == 2048 * MIB and costly_copy.kv_host == none.kv_host == 0
    assert cheap_copy.prefix_hit > none.prefix_hit > 0
    assert cheap_copy.throughput > none.throughput  # fewer prompt tokens to compute


def test_predicted_throughput_is_b_over_the_mean_step():
    pr = predict(COST, memory(8192), WORK, 8, Limits())
    assert math.isclose(pr.throughput, 8 / pr.tpot_s)
    assert pr.tpot_s > COST.decode_step(8, 8 * 160)  # the prefill share is in it

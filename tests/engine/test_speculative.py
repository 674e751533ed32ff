"""Speculative decoding in the engine: proposers, the planner, and verification that leaves the output
exactly as it would be without speculation (greedy and seeded) and the sampling distribution the
model's (chi-square against independent samples without speculation)."""

import random
from collections import Counter

import pytest
import torch

from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from shared.engine.speculative.ngram import NgramIndex
from shared.engine.speculative.planner import Acceptance, StepCost, plan_draft_lengths
from shared.engine.speculative.suffix import SuffixIndex, SuffixProposer
from tests.engine.helpers import greedy, make_engine, run_all
from tests.engine.test_engine import hand_off

METHODS = ("ngram", "suffix")


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("llama")))


def drafting(ckpt, method: str, **overrides):
    """An engine that scores every draft proposed (draft_length="fixed"): what it outputs must not depend
    on how many are accepted."""
    return make_engine(ckpt, speculative=method, draft_length="fixed", **overrides)


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase, so drafts are proposed from the first decode step on."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        phrase = [rng.randrange(10, 1000) for _ in range(rng.randrange(3, 9))]
        out.append([rng.randrange(10, 1000) for _ in range(i % 5)] + phrase * (2 + i % 4))
    return out


# ---- proposers and planner -------------------------------------------------------------------------
def test_ngram_index_proposes_what_followed_the_longest_latest_match():
    index = NgramIndex(min_n=1, max_n=3)
    tokens = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" occurred twice: the latest match (followed by 7 8) wins over the first (followed by 9)
    assert index.propose(tokens, 2) == [7, 8]
    tokens += [7]  # now "2 3 7" matches at length 3
    assert index.propose(tokens, 4) == [8, 5, 2, 3]
    assert NgramIndex(2, 3).propose([1, 2, 3, 4], 3) == []  # no earlier occurrence of "3 4"


def test_suffix_index_drafts_by_frequency_and_forgets_removed_outputs():
    index = SuffixIndex(depth=4)
    index.add([5, 6, 7, 8])
    index.add([5, 6, 7, 8])
    index.add([5, 6, 7, 9])
    draft, expected = index.draft([1, 5, 6], k=3, min_prob=0.1)
    assert draft == [7, 8]  # 7 always followed "5 6"; 8 followed "5 6 7" in 2 of 3; then nothing
    assert expected == pytest.approx(1 + 2 / 3)
    assert index.draft([1, 5, 6], k=3, min_prob=0.7)[0] == [7]  # 1 * 2/3 < 0.7 stops the draft
    index.remove([5, 6, 7, 8])
    index.remove([5, 6, 7, 8])
    index.remove([5, 6, 7, 9])
    assert index.next_tokens == {}


def test_suffix_proposer_drafts_from_an_earlier_request_s_output(ckpt):
    proposer = SuffixProposer(depth=4)
    engine = make_engine(ckpt)
    prompt = [11, 12, 13]
    finished = engine.new_seq("a", prompt, greedy(8), 0, 0, 0.0)
    finished.token_ids += [40, 41, 42, 43, 44]
    proposer.finished(finished)
    seq = engine.new_seq("b", [99, 11, 12, 13, 40, 41], greedy(8), 0, 0, 0.0)
    assert proposer.propose(seq, 3) == [42, 43, 44]


def test_planner_drafts_when_scoring_is_nearly_free_and_not_when_it_costs_in_proportion():
    proposed = [5] * 4  # draft tokens proposed per sequence
    memory_bound = StepCost({1: 0.010, 64: 0.012, 512: 0.080})
    assert plan_draft_lengths(proposed[:1], [0.8], 1, 1, memory_bound) == [5]
    assert plan_draft_lengths(proposed[:1], [0.0], 1, 1, memory_bound) == [0]  # text it cannot predict
    compute_bound = StepCost({1: 0.001, 512: 0.512})  # each scored token costs the same
    assert plan_draft_lengths(proposed, [0.8] * 4, 4, 4, compute_bound) == [0, 0, 0, 0]
    # the better-predicted sequence gets the longer draft
    lengths = plan_draft_lengths(proposed[:2], [0.9, 0.5], 2, 2, StepCost({1: 0.01, 4: 0.0101, 16: 0.02}))
    assert lengths[0] > lengths[1]


def test_step_cost_follows_observed_steps():
    cost = StepCost({1: 0.01, 16: 0.01})
    for _ in range(100):
        cost.observe(16, 0.05)
    assert cost(16) == pytest.approx(0.05, rel=0.01)
    assert cost(1) == pytest.approx(0.01)


def test_acceptance_falls_on_rejections_and_drifts_back_when_idle():
    acceptance = Acceptance(prior=0.5)
    for _ in range(10):
        acceptance.record(1, drafted=4, accepted=0)
    low = acceptance.of(1)
    assert low < 0.05
    for _ in range(50):
        acceptance.idle(1)
    assert low < acceptance.of(1) <= acceptance.average


# ---- the engine ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_greedy_output_is_unchanged_batched_chunked_and_preempted(ckpt, method):
    reqs = {f"r{i}": (p, greedy(40)) for i, p in enumerate(repetitive_prompts(8))}
    want = run_all(make_engine(ckpt), reqs)
    for overrides in ({}, {"max_num_batched_tokens": 16}, {"kv_blocks": 14}):
        engine = drafting(ckpt, method, **overrides)
        assert run_all(engine, reqs) == want, overrides
        spec = engine.speculator
        assert 0 < spec.accepted < spec.drafted  # drafts were both taken and refused
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # no draft block kept
        if "kv_blocks" in overrides:
            assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_stop_rules_and_logprobs_are_unchanged(ckpt, method):
    """Every sampling parameter that depends on the history is applied at each verified position."""
    ps = repetitive_prompts(6, seed=1)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True, logprobs=2),
        SamplingParams(
            temperature=1.0,
            top_k=5,
            seed=4,
            max_tokens=25,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            ignore_eos=True,
        ),
        SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=20, stop_token_ids=[ps[3][-1]]),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logit_bias={ps[4][0]: 3.0}),
        SamplingParams(temperature=0.9, seed=5, max_tokens=30, n=3, ignore_eos=True),
    ]
    reqs = {f"r{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))}
    plain = make_engine(ckpt)
    want = run_all(plain, reqs)
    engine = drafting(ckpt, method)
    assert run_all(engine, reqs) == want
    assert engine.speculator.accepted > 0
    assert len(want["r4"][0][0]) == 7
    stop_run = drafting(ckpt, method)
    text = want["r0"][0][1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stop_params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True, stop=[stop])
    assert run_all(stop_run, {"s": (ps[0], stop_params)}) == run_all(make_engine(ckpt), {"s": (ps[0], stop_params)})


def test_the_decode_worker_of_a_hand_off_speculates_and_equals_one_engine(ckpt):
    prompt = repetitive_prompts(8)[0]
    params = SamplingParams(temperature=0.8, top_k=2, seed=9, max_tokens=30, n=2, ignore_eos=True)
    want = run_all(make_engine(ckpt), {"x": (prompt, params)})["x"]
    decode = drafting(ckpt, "ngram")
    assert hand_off(make_engine(ckpt), decode, "x", prompt, params) == want
    assert decode.speculator.accepted > 0
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


def test_logprobs_of_accepted_tokens_are_the_model_s(ckpt):
    prompt = repetitive_prompts(8)[5]
    params = greedy(30, logprobs=3)

    def logprobs(engine):
        engine.add_request("x", prompt, params)
        out = []
        while engine.has_unfinished_requests():
            out += [lp for o in engine.step() for lp in o.outputs[0].logprobs]
        return out

    want = logprobs(make_engine(ckpt))
    engine = drafting(ckpt, "ngram")
    got = logprobs(engine)
    assert engine.speculator.accepted > 5
    assert len(got) == len(want) == 30
    for (lp, top), (want_lp, want_top) in zip(got, want):
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert [t for t, _ in top] == [t for t, _ in want_top]


def test_sampled_distribution_matches_sampling_without_speculation(ckpt):
    """Two-sample chi-square test on output tokens 2 to 4 (positions that speculation verifies), with
    independent seeds on each side. The prompt ends with the model's own greedy continuation, so the
    drafts are tokens the model gives real probability to: some accepted, some refused."""
    start = repetitive_prompts(8)[3]
    prompt = start + run_all(make_engine(ckpt), {"g": (start, greedy(8))})["g"][0][0]
    samples = 600

    def draw(engine, seed0):
        reqs = {
            f"r{i}": (prompt, SamplingParams(temperature=1.0, top_k=3, seed=seed0 + i, max_tokens=4, ignore_eos=True))
            for i in range(samples)
        }
        return Counter(tuple(r[0][0][1:]) for r in run_all(engine, reqs).values())

    engine = drafting(ckpt, "ngram", kv_blocks=1024)
    with_spec = draw(engine, 0)
    without = draw(make_engine(ckpt, kv_blocks=1024), 10**6)
    spec = engine.speculator
    assert spec.accepted > samples // 8 and spec.drafted - spec.accepted > samples // 8
    keys = [k for k in with_spec.keys() | without.keys() if with_spec[k] + without[k] >= 10]
    assert len(keys) >= 3
    stat = sum((with_spec[k] - without[k]) ** 2 / (with_spec[k] + without[k]) for k in keys)
    p_value = torch.special.gammaincc(torch.tensor((len(keys) - 1) / 2), torch.tensor(stat / 2)).item()
    assert p_value > 0.001, (stat, with_spec, without)


def test_adaptive_draft_lengths_follow_the_cost_of_scoring_tokens(ckpt):
    reqs = {f"r{i}": (p, greedy(20)) for i, p in enumerate(repetitive_prompts(4))}
    want = run_all(make_engine(ckpt), reqs)
    for cost, drafts in ((StepCost({1: 0.001, 4096: 4.096}), False), (StepCost({1: 0.01, 4096: 0.0101}), True)):
        engine = make_engine(ckpt, speculative="ngram")  # adaptive
        engine.speculator.cost = cost
        engine.speculator.observe_step = lambda *args: None
        assert run_all(engine, reqs) == want
        assert (engine.speculator.drafted > 0) == drafts

"""Each sampling parameter has a test that would catch it being ignored."""

import pytest
import torch

from shared.engine.errors import InvalidRequestError
from shared.engine.loader import load_checkpoint
from shared.engine.sampler import apply_logit_bias, apply_penalties, sample
from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import Sequence
from shared.messages import GenerateRequest
from tests.engine.helpers import greedy, make_engine, run_all

PROMPT = [101, 202, 303, 404, 505, 606, 707]


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("llama")))


def gen(ckpt, params: SamplingParams, prompt=PROMPT, companions: int = 0):
    reqs = {"x": (prompt, params)}
    for i in range(companions):
        reqs[f"c{i}"] = ([7 + i, 8, 9, 10 + i], sampled(max_tokens=12))
    return run_all(make_engine(ckpt), reqs)["x"]


def sampled(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 16, "ignore_eos": True, **kw})


def test_top_k_one_equals_greedy(ckpt):
    assert gen(ckpt, sampled(top_k=1, seed=3))[0][0] == gen(ckpt, greedy(16))[0][0]


def test_tiny_top_p_and_full_min_p_equal_greedy(ckpt):
    want = gen(ckpt, greedy(16))[0][0]
    assert gen(ckpt, sampled(top_p=1e-6, seed=1))[0][0] == want
    assert gen(ckpt, sampled(min_p=1.0, seed=2))[0][0] == want


def test_temperature_one_differs_from_greedy(ckpt):
    outs = {tuple(gen(ckpt, sampled(seed=s))[0][0]) for s in range(4)}
    assert len(outs) > 1


def test_seed_is_reproducible_whatever_else_is_in_the_batch(ckpt):
    alone = gen(ckpt, sampled(seed=1234))[0][0]
    crowded = gen(ckpt, sampled(seed=1234), companions=5)[0][0]
    assert alone == crowded
    assert gen(ckpt, sampled(seed=999))[0][0] != alone


def test_max_tokens_and_length_finish(ckpt):
    ids, _, reason = gen(ckpt, greedy(7))[0]
    assert len(ids) == 7 and reason == "length"


def test_stop_token_ids_and_min_tokens(ckpt):
    first = gen(ckpt, greedy(8))[0][0]
    ids, _, reason = gen(ckpt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first[0]]))[0]
    assert ids == [first[0]] and reason == "stop"
    ids, _, _ = gen(ckpt, SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[first[0]]))[0]
    assert len(ids) >= 4 and ids[0] != first[0]  # banned until min_tokens


def test_eos_stops_unless_ignored(ckpt):
    first = gen(ckpt, greedy(8))[0][0]
    engine = make_engine(ckpt)
    engine.eos_token_ids = [first[2]]
    out = run_all(engine, {"e": (PROMPT, SamplingParams(temperature=0, max_tokens=8))})["e"][0]
    assert out[0] == first[:3] and out[2] == "stop"
    out = run_all(engine, {"i": (PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))})
    assert out["i"][0][0] == first


def test_stop_string_across_token_boundary_is_excluded(ckpt):
    tok = ckpt.tokenizer
    ids, text, _ = gen(ckpt, greedy(24))[0]
    # a stop string made of the last character of one token and the first of the next
    for i in range(2, len(ids) - 1):
        before, after = tok.decode(ids[: i + 1]), tok.decode(ids[: i + 2])
        if len(after) > len(before) and after.startswith(before) and before[-1:].strip():
            stop = before[-1] + after[len(before)]
            if text.find(stop) == len(before) - 1:
                break
    else:
        pytest.skip("no suitable token boundary in this output")
    params = {"temperature": 0, "max_tokens": 24, "stop": [stop], "ignore_eos": True}
    _, got, reason = gen(ckpt, SamplingParams(**params))[0]
    assert reason == "stop" and got == text[: len(before) - 1]
    _, got, _ = gen(ckpt, SamplingParams(**params, include_stop_str_in_output=True))[0]
    assert got == text[: len(before) + 1]


def test_streamed_text_equals_final_text_with_stop_strings(ckpt):
    _, text, _ = gen(ckpt, greedy(24))[0]
    engine = make_engine(ckpt)
    engine.add_request("s", PROMPT, greedy(24, stop=["zzzz"]))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [d.text for o in engine.step() for d in o.outputs]
    assert "".join(deltas) == text


def test_penalties_move_probability_the_right_way():
    seq = Sequence("p", [1, 2], SamplingParams(repetition_penalty=2.0))
    seq.token_ids += [3, 3]
    logits = torch.tensor([[0.0, 4.0, -4.0, 4.0, 4.0]])
    out = apply_penalties(logits, [seq])
    assert out[0, 1] == 2.0 and out[0, 2] == -8.0 and out[0, 3] == 2.0 and out[0, 4] == 4.0
    seq.params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_penalties(logits, [seq])
    assert out[0, 3] == 4.0 - 1.0 - 2 * 0.5  # output token seen twice
    assert out[0, 1] == 4.0  # prompt tokens are not output tokens
    seq.params = SamplingParams(presence_penalty=-1.0)
    assert apply_penalties(logits, [seq])[0, 3] == 5.0


def test_repetition_penalty_reduces_repeats(ckpt):
    def repeats(ids):
        return len(ids) - len(set(ids))

    plain = gen(ckpt, greedy(32))[0][0]
    penalized = gen(ckpt, greedy(32, repetition_penalty=5.0))[0][0]
    assert repeats(penalized) < repeats(plain)


def test_logprobs_are_returned_per_token(ckpt):
    ids, _, _ = gen(ckpt, greedy(5, logprobs=3))[0]
    engine = make_engine(ckpt)
    engine.add_request("l", PROMPT, greedy(5, logprobs=3))
    lps = []
    while engine.has_unfinished_requests():
        lps += [lp for o in engine.step() for d in o.outputs for lp in d.logprobs]
    assert len(lps) == 5
    for token, (lp, top) in zip(ids, lps):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - lp) < 1e-6  # greedy = argmax
        assert lp <= 0


# --- logit_bias and parameter ranges (issue 9 §2) ------------------------------------------------------


def one_row(params: SamplingParams, logits: list[float]):
    """sample() on a single hand-made row: (token, its logprob or None)."""
    seq = Sequence("b", [0], params)
    out = sample(torch.tensor([logits]), [seq], eos_token_ids=[])
    return out.token_ids[0], out.logprobs[0]


def test_logit_bias_forces_or_bans_a_token_greedy_and_sampled():
    logits = [0.0, 5.0, 1.0, -3.0, 2.0]  # argmax 1
    assert one_row(SamplingParams(temperature=0), logits)[0] == 1
    assert one_row(SamplingParams(temperature=0, logit_bias={3: 100}), logits)[0] == 3
    assert one_row(SamplingParams(temperature=0, logit_bias={1: -100}), logits)[0] == 4  # the runner-up
    for _ in range(5):  # sampled rows too: +100 dwarfs every other logit, -100 leaves no mass
        assert one_row(SamplingParams(temperature=1, logit_bias={3: 100}), logits)[0] == 3
        forced = SamplingParams(temperature=2, logit_bias={t: -100 for t in (0, 2, 3, 4)})
        assert one_row(forced, logits)[0] == 1


def test_logit_bias_leaves_logprobs_raw_and_the_callers_logits_alone():
    logits = torch.tensor([[0.0, 5.0, 1.0, -3.0, 2.0]])
    seq = Sequence("b", [0], SamplingParams(temperature=0, logprobs=2, logit_bias={3: 100}))
    out = sample(logits, [seq], eos_token_ids=[])
    raw = torch.log_softmax(logits[0], dim=-1)
    lp, top = out.logprobs[0]
    assert out.token_ids == [3] and abs(lp - raw[3].item()) < 1e-6  # the model's own logprob of 3
    assert [t for t, _ in top] == [1, 4]
    assert logits[0, 3] == -3.0
    assert torch.equal(apply_logit_bias(logits, [seq]), torch.tensor([[0.0, 5.0, 1.0, 97.0, 2.0]]))


def test_logit_bias_only_touches_its_own_row_and_skips_ids_past_the_vocabulary():
    logits = torch.zeros(2, 4)
    seqs = [Sequence("a", [0], SamplingParams(logit_bias={1: 3.0, 99: 5.0})), Sequence("b", [0], SamplingParams())]
    out = apply_logit_bias(logits, seqs)
    assert out.tolist() == [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_logit_bias_applies_after_penalties():
    seq = Sequence("p", [1], SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={1: 1.0}))
    logits = torch.tensor([[0.0, 4.0, 2.8]])
    # penalty then bias: 4 / 2 + 1 = 3 (token 1 wins); bias then penalty would give (4 + 1) / 2 = 2.5
    assert sample(logits, [seq], eos_token_ids=[]).token_ids == [1]
    assert apply_logit_bias(apply_penalties(logits, [seq]), [seq])[0, 1] == 3.0


def test_logit_bias_survives_the_bus_with_int_keys():
    params = SamplingParams(logit_bias={5: -100, 49151: 100, 7: 2.5})
    req = GenerateRequest("r", [1, 2], params.to_dict(), "reply")
    back = SamplingParams.from_dict(GenerateRequest.decode(req.encode()).params)
    assert back.logit_bias == {5: -100, 49151: 100, 7: 2.5} and all(type(k) is int for k in back.logit_bias)
    assert back == params


def test_tiny_temperature_is_greedy_not_nan():
    params = SamplingParams(temperature=1e-30)
    assert params.greedy
    assert one_row(params, [0.0, 50.0, 49.0])[0] == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 9},
        {"temperature": 2.0001},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 10**400},
        {"top_p": float("nan")},
        {"min_p": float("nan")},
        {"repetition_penalty": float("nan")},
        {"repetition_penalty": float("inf")},
        {"repetition_penalty": 0},
        {"presence_penalty": float("nan")},
        {"logprobs": 21},
        {"logprobs": True},
        {"n": True},
    ],
)
def test_sampling_params_refuse_out_of_range_values(kw):
    name = next(iter(kw))
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kw)
    assert info.value.param == name and info.value.message.startswith(name) and len(info.value.message) < 120


@pytest.mark.parametrize(
    "bias", [[1], {"5": 1}, {True: 1}, {5: 100.01}, {5: -101}, {5: float("nan")}, {5: float("-inf")}, {5: "1"}]
)
def test_sampling_params_refuse_bad_logit_bias(bias):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"


def test_sampling_params_edge_values():
    p = SamplingParams(
        temperature=2,
        top_p=1,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=20,
        logit_bias={0: -100, 1: 100.0},
        repetition_penalty=1e-3,
        min_p=1,
    )
    assert p.logit_bias == {0: -100, 1: 100.0} and SamplingParams().logit_bias == {}

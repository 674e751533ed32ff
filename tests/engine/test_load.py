"""What the engine measures of its steps and reports of its load, for the router's predictions."""

import pytest

from shared.cost_model import fit, save_profile
from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from tests.engine.helpers import make_engine


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("llama")))


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_each_step_is_a_sample_and_the_load_counts_prompts_left_and_decodes(ckpt):
    engine = make_engine(ckpt, max_num_batched_tokens=64)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(10 + 100 * i, 50 + 100 * i)), params(4))  # 40 tokens, none shared
    engine.step()  # r0's whole prompt (40) and 24 tokens of r1's
    sample = engine.costs.recent[-1]
    assert (sample.seqs, sample.tokens, sample.attention, sample.context) == (2, 64, 40 * 40 + 24 * 24, 0)
    assert sample.seconds > 0
    load = engine.stats()["load"]
    assert (load.decode_seqs, load.decode_context_tokens) == (1, 41)  # r0 decodes, holding 40 + 1 tokens
    assert load.prefill_tokens == 16 + 40  # the rest of r1, all of r2
    engine.step()  # r0's decode (its 41st token), the rest of r1 (16 after 24), all of r2
    sample = engine.costs.recent[-1]
    assert (sample.seqs, sample.tokens) == (3, 1 + 16 + 40)
    assert (sample.attention, sample.context) == (16 * 40 + 40 * 40, 41)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["load"].prefill_tokens == 0 and engine.stats()["load"].decode_seqs == 0


def test_the_fit_is_reported_once_it_has_seen_enough_steps(ckpt):
    engine = make_engine(ckpt)
    assert engine.stats()["cost"] == {}
    for i in range(4):
        engine.add_request(f"r{i}", list(range(10, 10 + 8 * (i + 1))), params(20))
    while engine.has_unfinished_requests():
        engine.step()
    assert set(engine.stats()["cost"]) == {"step", "seq", "token", "attention", "context"}
    assert engine.stats()["load"].prefill_seconds == 0.0


def test_a_profile_seeds_the_fit_before_the_first_step(ckpt, tmp_path):
    warm = make_engine(ckpt)
    for i in range(4):
        warm.add_request(f"r{i}", list(range(10, 40)), params(20))
    while warm.has_unfinished_requests():
        warm.step()
    samples = list(warm.costs.recent)
    path = tmp_path / "profile.json"
    save_profile(path, samples, {"model": "tiny"})
    engine = make_engine(ckpt, cost_profile=str(path), max_num_batched_tokens=32)
    assert engine.costs.model == fit(samples) and engine.stats()["cost"] == fit(samples).to_dict()
    engine.add_request("x", list(range(100, 130)), params(2))
    engine.add_request("y", list(range(200, 230)), params(2))
    engine.step()  # x's prompt (30) and 2 tokens of y's: the other 28 are priced by the profile's fit
    load = engine.stats()["load"]
    assert load.prefill_tokens == 28
    assert load.prefill_seconds == pytest.approx(engine.costs.model.prefill_work(28, 2))

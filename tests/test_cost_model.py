"""The step-cost model: a non-negative fit that recovers known costs, the online refit, the profile file."""

import pytest

from shared.cost_model import (
    MIN_SAMPLES,
    REFIT_EVERY,
    CostModel,
    StepCosts,
    StepSample,
    fit,
    load_profile,
    relative_errors,
    save_profile,
)

TRUE = CostModel(step=0.004, seq=0.0002, token=0.0001, attention=2e-8, context=5e-7)


def shapes() -> list[tuple[int, int, int, int]]:
    """(seqs, tokens, attention, context): lone prefills of several lengths, decode batches at several contexts,
    and steps that mix a prompt chunk with decodes."""
    prefills = [(1, n, n * n, 0) for n in (16, 64, 256, 1024)]
    decodes = [(b, b, 0, b * c) for b in (1, 4, 16, 64) for c in (64, 512, 2048)]
    mixed = [(1 + b, 256 + b, 256 * 512, b * 300) for b in (2, 8)]
    return prefills + decodes + mixed


def samples(model: CostModel, scale: float = 1.0) -> list[StepSample]:
    return [StepSample(*shape, scale * model.step_seconds(*shape)) for shape in shapes()]


def test_fit_recovers_the_costs_that_made_the_steps():
    fitted = fit(samples(TRUE))
    for name in ("step", "seq", "token", "attention", "context"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6)
    assert max(relative_errors(fitted, samples(TRUE))) < 1e-9


def test_prefill_is_quadratic_and_decode_linear_in_batch_times_context():
    assert TRUE.prefill_work(100) == pytest.approx(100 * TRUE.token + 100 * 100 * TRUE.attention)
    assert TRUE.prefill_work(100, context=50) == pytest.approx(100 * TRUE.token + 100 * 150 * TRUE.attention)
    step = TRUE.step + 8 * (TRUE.seq + TRUE.token) + 4000 * TRUE.context
    assert TRUE.decode_step(8, 4000) == pytest.approx(step)
    assert TRUE.decode_step(0, 0) == 0.0


def test_no_coefficient_is_negative_even_when_the_data_would_prefer_one():
    # Steps that get cheaper with more sequences: the best plain least-squares fit has a negative c_seq.
    data = [StepSample(s, 10 * s, 0, 0, 0.01 + 0.001 * 10 * s - 0.004 * s) for s in range(1, 40)]
    fitted = fit(data)
    assert all(value >= 0 for value in fitted.to_dict().values())


def test_too_few_steps_fit_nothing():
    assert fit(samples(TRUE)[: MIN_SAMPLES - 1]) is None
    assert CostModel.from_dict({}) is None
    assert CostModel.from_dict(TRUE.to_dict()) == TRUE


def test_the_online_fit_starts_from_the_profile_and_follows_the_machine():
    costs = StepCosts(prior=samples(TRUE))
    assert costs.model.token == pytest.approx(TRUE.token, rel=1e-6)
    slower = CostModel(
        step=0.008, seq=0.0004, token=0.0002, attention=4e-8, context=1e-6
    )  # the same shapes, twice as slow
    new = samples(slower) * 8
    for sample in new[: REFIT_EVERY - 1]:
        costs.observe(sample)
    assert costs.model.token == pytest.approx(TRUE.token, rel=1e-6)  # refits only every REFIT_EVERY steps
    for sample in new[REFIT_EVERY - 1 :]:
        costs.observe(sample)
    assert costs.model.token > 1.5 * TRUE.token  # most samples are now the slower machine's


def test_without_a_profile_the_fit_comes_from_the_first_steps():
    costs = StepCosts()
    assert costs.model is None
    for sample in samples(TRUE)[:MIN_SAMPLES]:
        costs.observe(sample)
    assert costs.model is not None


def test_a_profile_file_round_trips(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(path, samples(TRUE), {"model": "m", "device": "cpu"})
    loaded, meta = load_profile(path)
    assert loaded == samples(TRUE)
    assert meta["model"] == "m" and meta["device"] == "cpu"
    assert CostModel.from_dict(meta["fit"]).token == pytest.approx(TRUE.token, rel=1e-6)

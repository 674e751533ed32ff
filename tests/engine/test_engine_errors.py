"""Bad input to the engine API raises a typed error, and the engine keeps serving."""

import pytest

from shared.engine.errors import InvalidRequestError
from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from tests.engine.helpers import greedy, make_engine, run_all


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(load_checkpoint(str(tiny_model_dir("llama"))))


@pytest.mark.parametrize(
    "make",
    [
        lambda e: ([], greedy()),
        lambda e: ([1] * e.max_model_len, greedy()),
        lambda e: ([1, 2], greedy(max_tokens=e.max_model_len)),
        lambda e: ([1, -5], greedy()),
        lambda e: ([1, e.model_config.vocab_size], greedy()),
    ],
)
def test_bad_prompt_raises_and_engine_keeps_serving(engine, make):
    with pytest.raises(InvalidRequestError):
        engine.validate(*make(engine))  # what every boundary (the worker, LLM) asks before add_request
    out = run_all(engine, {"good": ([1, 2, 3], greedy(4))})
    assert len(out["good"][0][0]) == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"temperature": -1},
        {"top_k": -2},
        {"stop": [1]},
        {"stop": 5},
        {"n": 0},
        {"min_p": 2.0},
        {"presence_penalty": 3},
        {"repetition_penalty": 0},
        {"logprobs": 50},
        {"min_tokens": 9, "max_tokens": 3},
        {"seed": "x"},
    ],
)
def test_bad_sampling_params_raise_a_typed_error(kwargs):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("dup", [1, 2, 3], greedy(2))
    with pytest.raises(InvalidRequestError):
        engine.add_request("dup", [1, 2, 3], greedy(2))
    engine.abort_request("dup")

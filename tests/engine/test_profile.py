"""`xllm profile --quick` on a tiny random model: the file it writes, and a worker engine seeded by it."""

import pytest

from shared.cost_model import load_profile
from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from xllm.cli import main


@pytest.fixture(scope="module")
def profile(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    model = str(tiny_model_dir("llama"))
    path = str(tmp_path_factory.mktemp("profile") / "profile.json")
    assert main(["profile", "--quick", "--model", model, "--num-threads", "2", "--output", path]) == 0
    return model, path


def test_profile_keeps_prefill_and_decode_steps_and_says_where_they_were_measured(profile, capsys):
    model, path = profile
    samples, meta = load_profile(path)
    assert any(s.tokens > s.seqs for s in samples)  # prefills
    assert any(s.tokens == s.seqs > 1 for s in samples)  # batched decodes
    assert all(s.seconds > 0 and s.attention + s.context >= s.tokens for s in samples)
    assert meta["model"] == model and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["num_threads"] == 2 and meta["max_num_batched_tokens"] == 2048
    assert meta["created"] and meta["command"].startswith("xllm profile --quick")
    assert meta["fit"] is not None


def test_a_worker_given_the_profile_has_a_cost_model_before_its_first_step(profile):
    model, path = profile
    config = EngineConfig(model=model, num_threads=2, kv_cache_memory=8 << 20, cost_profile=path)
    engine = LLMEngine(config)
    assert engine.costs.model is not None
    assert engine.costs.model.token > 0 or engine.costs.model.step > 0
    assert LLMEngine(EngineConfig(model=model, num_threads=2, kv_cache_memory=8 << 20)).costs.model is None


@pytest.mark.parametrize("args", [["--max-num-seqs", "0"], ["--dtype", "fp8"], ["--num-threads", "two"], ["--unknown"]])
def test_a_bad_option_is_refused_with_2(args, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["profile", *args])
    assert refused.value.code == 2
    assert "xllm profile" in capsys.readouterr().err


def test_a_model_that_is_not_there_is_refused_with_2(tmp_path, capsys):
    assert main(["profile", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "p.json")]) == 2
    assert "xllm profile:" in capsys.readouterr().err

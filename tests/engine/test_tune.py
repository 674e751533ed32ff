"""`xllm tune --quick` on a tiny random model: it profiles, chooses, runs its choice, and writes a file that
`xllm up --config` turns into worker flags and workers read as their cost profile."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from shared.config import load_config
from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from xllm.cli import main
from xllm.tune.config import up_defaults
from xllm.up import UpConfig, plan


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory) -> tuple[str, str, str]:
    model = str(tiny_model_dir("llama"))
    path = str(tmp_path_factory.mktemp("tune") / "tuned.json")
    args = ["--quick", "--model", model, "--num-threads", "2", "--tpot-slo-ms", "50", "--max-num-seqs", "8"]
    args += ["--prompt-len", "32", "--output-len", "8", "--memory", str(64 << 20), "--output", path]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["tune", *args]) == 0
    return model, path, out.getvalue()


def test_tune_writes_settings_within_its_limits_and_explains_them(tuned):
    _, path, out = tuned
    assert "model's choice: B=" in out and "binds:" in out and "predicted -> measured" in out
    data = json.loads(Path(path).read_text())
    up = data["up"]
    assert 1 <= up["max_num_seqs"] <= 8 and 64 <= up["max_num_batched_tokens"] <= 4096
    assert 0 < up["kv_cache_memory"] < 64 << 20 and up["step_slo_ms"] == 50 and up["mode"] == "colocated"
    assert data["tune"]["runs"] and data["fit"] is not None and data["command"].startswith("xllm tune --quick")


def test_the_file_starts_workers_with_its_settings_and_its_steps(tuned):
    model, path, _ = tuned
    argv = ["--config", path]
    config = load_config(UpConfig, argv, defaults=up_defaults(argv))
    assert config.model == model and config.mode == "colocated" and config.step_slo_ms == 50
    (worker,) = [s.argv for s in plan(config, "nats://x:4222") if s.name.startswith("colocated")]
    assert worker[worker.index("--step-slo-ms") + 1] == "50.0"
    engine = LLMEngine(EngineConfig(model=model, num_threads=2, kv_cache_memory=8 << 20, cost_profile=path))
    assert engine.costs.model is not None


def test_an_impossible_memory_budget_is_a_clear_error(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    assert main(["tune", "--quick", "--model", model, "--tpot-slo-ms", "50", "--memory", "1000"]) == 2
    assert "cannot hold the weights" in capsys.readouterr().err

"""A file `xllm tune` writes round-trips into `xllm up`'s worker flags and from them into the engine's config;
flags still win over it; the file is also the workers' cost profile."""

import pytest

from services.worker.config import WorkerConfig
from shared.config import load_config
from shared.cost_model import StepSample
from shared.engine.load import step_costs
from xllm.tune.config import up_defaults, write_config
from xllm.up import UpConfig, plan

UP = {
    "model": "smollm2",
    "mode": "colocated",
    "max_num_seqs": 24,
    "max_num_batched_tokens": 512,
    "kv_cache_memory": 300 << 20,
    "kv_host_memory": None,
    "step_slo_ms": 100.0,
    "worker_threads": 2,
}
SAMPLES = [
    StepSample(1 + i % 4, 1 + i % 4 + 30 * (i % 3), 900 * (i % 3), 100 * (i % 5), 0.01 + 0.001 * i) for i in range(12)
]


def tuned(tmp_path, **changes) -> str:
    path = tmp_path / "tuned.json"
    write_config(path, {**UP, **changes}, SAMPLES, {"model": "smollm2"}, {"binds": "tpot"})
    return str(path)


def workers(argv: list[str]) -> dict[str, WorkerConfig]:
    config = load_config(UpConfig, argv, defaults=up_defaults(argv))
    return {
        s.name: load_config(WorkerConfig, s.argv[s.argv.index("-m") + 2 :])
        for s in plan(config, "nats://x:4222")
        if s.name.startswith(("colocated", "prefill", "decode"))
    }


def test_the_tuned_settings_reach_every_colocated_workers_engine(tmp_path):
    path = tuned(tmp_path)
    found = workers(["--config", path, "--decode", "2"])
    assert sorted(found) == ["colocated-0", "colocated-1"]
    for worker in found.values():
        engine = worker.engine_config()
        assert (engine.max_num_seqs, engine.max_num_batched_tokens, engine.step_slo_ms) == (24, 512, 100.0)
        assert engine.kv_cache_memory == 300 << 20 and engine.kv_host_memory is None and engine.num_threads == 2
        assert engine.cost_profile == str((tmp_path / "tuned.json").resolve())


def test_a_flag_wins_over_the_file(tmp_path):
    (worker, *_) = workers(["--config", tuned(tmp_path), "--max-num-seqs", "8"]).values()
    assert worker.max_num_seqs == 8 and worker.max_num_batched_tokens == 512


def test_the_config_file_can_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XLLM_CONFIG", tuned(tmp_path, max_num_seqs=12))
    (worker, *_) = workers([]).values()
    assert worker.max_num_seqs == 12


def test_prefill_workers_do_not_get_the_step_target(tmp_path):
    found = workers(["--config", tuned(tmp_path), "--mode", "disaggregated"])
    assert found["prefill-0"].step_slo_ms is None and found["decode-1"].step_slo_ms == 100.0


def test_without_a_file_nothing_changes():
    (worker, *_) = workers(["--mode", "colocated"]).values()
    assert (worker.max_num_batched_tokens, worker.step_slo_ms) == (2048, None)


def test_the_file_seeds_the_workers_step_cost_fit(tmp_path):
    costs = step_costs(tuned(tmp_path))
    assert len(costs.prior) == len(SAMPLES) and costs.model is not None


def test_a_file_that_is_not_a_tune_file_is_refused(tmp_path):
    other = tmp_path / "profile.json"
    other.write_text('{"samples": []}')
    with pytest.raises(SystemExit, match="not a file `xllm tune` wrote"):
        up_defaults(["--config", str(other)])

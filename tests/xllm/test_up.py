"""`xllm up`'s plan and checks for the multimodal encoder (the rest of its plan: tests/test_compose.py)."""

import json

import pytest

from shared.config import load_config
from xllm.up import UpConfig, plan


def test_encoders_are_planned_with_the_model_and_the_router_gets_the_encode_mode(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    config = load_config(UpConfig, ["--model", str(tmp_path), "--encoder", "2", "--encode", "always"])
    services = {s.name: s.argv for s in plan(config, "nats://x:4222")}
    encoders = [argv for name, argv in services.items() if name.startswith("encoder-")]
    assert len(encoders) == 2 and all("services.encoder" in a and str(tmp_path) in a for a in encoders)
    assert services["router"][-4:-2] == ["--encode", "always"]


def test_an_encoder_for_a_model_that_takes_no_images_is_refused_at_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(UpConfig, ["--encoder", "1"])  # the default model is text-only
    assert exit_.value.code == 2 and "takes images" in capsys.readouterr().err


def test_mixed_mode_starts_switchable_workers_in_their_first_roles_and_gives_everyone_the_targets():
    args = ["--mode", "mixed", "--prefill", "1", "--decode", "2", "--slo-ttft-ms", "900", "--cost-profile", "p.json"]
    services = {s.name: s.argv for s in plan(load_config(UpConfig, args), "nats://x:4222")}
    workers = {name: argv for name, argv in services.items() if name.startswith("mixed-")}
    assert sorted(workers) == ["mixed-0", "mixed-1", "mixed-2"]
    assert all("services.mixed" in argv and "p.json" in argv for argv in workers.values())
    firsts = [argv[argv.index("--initial-role") + 1] for argv in workers.values()]
    assert sorted(firsts) == ["decode", "decode", "prefill"]
    for name in ("router", "gateway"):
        assert float(services[name][services[name].index("--slo-ttft-ms") + 1]) == 900
    assert "--slo-tpot-ms" not in services["router"]
    assert services["router"][services["router"].index("--mode") + 1] == "auto"


def test_mixed_mode_without_a_target_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(UpConfig, ["--mode", "mixed"])
    assert exit_.value.code == 2 and "--slo-ttft-ms" in capsys.readouterr().err

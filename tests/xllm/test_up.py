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

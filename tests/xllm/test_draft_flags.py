"""`--speculative draft --draft-model M` through the interfaces: `xllm generate`, worker settings, `xllm up`'s
plan and `xllm bench engine` (generate run end to end: tests/engine/test_speculative_draft.py); and
`--speculative draft` without a draft model refused at once, with a clear message."""

import pytest

from services.worker.config import WorkerConfig
from shared.config import load_config
from xllm.bench import engine as bench_engine
from xllm.cli import generate
from xllm.up import UpConfig, plan


def test_generate_refuses_draft_without_a_draft_model(capsys):
    assert generate(["--prompt", "hi", "--speculative", "draft"]) == 2
    assert "--speculative draft needs --draft-model" in capsys.readouterr().err


def test_workers_get_the_draft_model_and_prefill_workers_do_not():
    config = load_config(WorkerConfig, ["--speculative", "draft", "--draft-model", "small.gguf"])
    assert config.engine_config().draft_model == "small.gguf"
    assert config.engine_config().speculative == "draft"
    prefill = config.engine_config(speculate=False)
    assert (prefill.speculative, prefill.draft_model) == ("none", None)


@pytest.mark.parametrize("config_class", [WorkerConfig, UpConfig])
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speculative", "draft"], "--speculative draft needs --draft-model"),
        (["--speculative", "ngram", "--draft-model", "m"], "--draft-model is for --speculative draft"),
    ],
)
def test_a_draft_model_missing_or_unused_is_refused_at_once(config_class, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(config_class, argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_up_gives_decode_workers_the_draft_model_and_prefill_workers_nothing_of_it():
    config = load_config(UpConfig, ["--speculative", "draft", "--draft-model", "small.gguf"])
    services = {s.name: s.argv for s in plan(config, "nats://x:4222")}
    decode, prefill = services["decode-1"], services["prefill-0"]
    assert decode[decode.index("--draft-model") + 1] == "small.gguf"
    assert decode[decode.index("--speculative") + 1] == "draft"
    assert "--draft-model" not in prefill and "--speculative" not in prefill


def test_bench_engine_refuses_draft_without_a_draft_model(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_engine.main(["--speculative", "draft"])
    assert exit_.value.code == 2 and "needs --draft-model" in capsys.readouterr().err

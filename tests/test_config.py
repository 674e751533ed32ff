"""shared/config.py: dataclass -> flags + XLLM_* env vars, checked at start (exit code 2 on bad values)."""

from dataclasses import dataclass

import pytest

from services.gateway.config import GatewayConfig
from shared.config import env_name, load_config, opt


@dataclass
class DemoConfig:
    """A demo service."""

    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8000, "port", min=0, max=65535)
    ratio: float = opt(0.5, "a fraction", min=0.0, max=1.0)
    verbose: bool = opt(False, "talk more")
    api_key: str | None = opt(None, "secret")
    limit: int | None = opt(None, "optional cap", min=1)
    mode: str = opt("colocated", "topology", choices=("colocated", "disaggregated"))
    urls: tuple[str, ...] = opt(("a", "b"), "servers")
    ports: list[int] = opt([1], "a list default is copied per instance", min=1)  # noqa: RUF009
    legacy: str = opt("x", "read from another env var", env="OLD_NAME")

    def validate(self) -> None:
        if self.mode == "disaggregated" and self.port == 0:
            raise ValueError("--port 0 is not allowed in disaggregated mode")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("XLLM_") or key == "OLD_NAME":
            monkeypatch.delenv(key)


def fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        load_config(DemoConfig, argv, prog="demo")
    assert info.value.code == 2
    return capsys.readouterr().err


def test_defaults() -> None:
    c = load_config(DemoConfig, [])
    assert c == DemoConfig()
    assert c.urls == ("a", "b") and c.ports == [1] and c.ports is not DemoConfig().ports


def test_flags_are_kebab_case_and_typed() -> None:
    argv = [
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--ratio",
        "0.25",
        "--verbose",
        "--api-key",
        "k",
        "--limit",
        "3",
        "--mode",
        "disaggregated",
        "--urls",
        "x, y",
        "--ports",
        "5,6",
    ]
    c = load_config(DemoConfig, argv)
    assert (c.host, c.port, c.ratio, c.verbose, c.api_key, c.limit) == ("0.0.0.0", 9000, 0.25, True, "k", 3)
    assert (c.mode, c.urls, c.ports) == ("disaggregated", ("x", "y"), [5, 6])
    assert load_config(DemoConfig, ["--no-verbose"]).verbose is False


def test_env_vars_give_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("max_body_bytes") == "XLLM_MAX_BODY_BYTES"
    monkeypatch.setenv("XLLM_PORT", "7000")
    monkeypatch.setenv("XLLM_VERBOSE", "yes")
    monkeypatch.setenv("XLLM_API_KEY", "from-env")
    monkeypatch.setenv("XLLM_LIMIT", "none")
    monkeypatch.setenv("OLD_NAME", "legacy-value")
    c = load_config(DemoConfig, [])
    assert (c.port, c.verbose, c.api_key, c.limit, c.legacy) == (7000, True, "from-env", None, "legacy-value")
    c = load_config(DemoConfig, ["--port", "7001", "--no-verbose"])
    assert (c.port, c.verbose) == (7001, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "eighty"], "expected int, got 'eighty'"),
        (["--port", "70000"], "--port (or XLLM_PORT): must be <= 65535, got 70000"),
        (["--port", "-1"], "must be >= 0"),
        (["--ratio", "2"], "--ratio (or XLLM_RATIO): must be <= 1.0"),
        (["--limit", "0"], "--limit (or XLLM_LIMIT): must be >= 1"),
        (["--mode", "mesh"], "must be one of colocated, disaggregated; got 'mesh'"),
        (["--mode", "disaggregated", "--port", "0"], "--port 0 is not allowed in disaggregated mode"),
        (["--unknown"], "unrecognized arguments: --unknown"),
        (["--ports", "1,0"], "--ports (or XLLM_PORTS): must be >= 1, got 0"),
        (["--ports", "1,x"], "expected int, got 'x'"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(argv, message, capsys) -> None:
    err = fails(argv, capsys)
    assert message in err and err.startswith("usage: demo")


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("XLLM_PORT", "http", "XLLM_PORT='http': expected int"),
        ("XLLM_VERBOSE", "maybe", "XLLM_VERBOSE='maybe': expected a boolean"),
        ("XLLM_RATIO", "-0.5", "must be >= 0.0"),
    ],
)
def test_bad_env_vars_exit_2(monkeypatch, capsys, var, value, message) -> None:
    monkeypatch.setenv(var, value)
    assert message in fails([], capsys)


def test_help_names_env_vars_and_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(DemoConfig, ["--help"], prog="demo")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "A demo service." in out and "--api-key" in out and "XLLM_API_KEY" in out
    assert "default: 8000" in out and "{colocated,disaggregated}" in out and "OLD_NAME" in out


def test_gateway_config_loads(monkeypatch) -> None:
    monkeypatch.setenv("XLLM_API_KEY", "k")
    c = load_config(GatewayConfig, ["--port", "8080", "--max-inflight", "4", "--first-token-timeout-s", "1.5"])
    assert (c.port, c.max_inflight, c.first_token_timeout_s, c.api_key) == (8080, 4, 1.5, "k")
    assert c.max_body_bytes >= 1024 * 1024 and c.served_model_name is None


def test_gateway_config_refuses_bad_values(capsys) -> None:
    for argv in (["--max-inflight", "0"], ["--log-level", "loud"], ["--inter-token-timeout-s", "0"]):
        with pytest.raises(SystemExit):
            load_config(GatewayConfig, argv)
        assert "error:" in capsys.readouterr().err

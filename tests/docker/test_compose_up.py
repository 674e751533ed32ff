"""`docker compose up --build`, for real: the image built, one container per service, requests served.

Needs a Docker daemon: it uses a running one, or starts `dockerd` (as root) and stops it at the end;
without either it skips, saying why. Where `debootstrap` is there (and root), the base images come from
deploy/local-base.sh (no image registry needed), else from the Dockerfile's defaults (Docker Hub and
PyTorch's index). Then, every step bounded in time, against the compose project `xllmtest<pid>`:

- `up -d --build --scale decode=2` (1 prefill, 2 decode workers, the router splitting every request);
  /health turns 200, every container's health check passes, they run as uid 10001, the workers run the
  C++ kernels the builder stage compiled, and the image has no compiler;
- a chat completion and a streamed one through the published port;
- the prompt's KV crossed from the prefill container to a decode container (the TCP data plane: they
  are separate hosts), by the workers' /metrics counters;
- an offline job submitted over NATS from outside the containers (`xllm submit` on the published port);
- one decode worker SIGKILLed: a request is still served, and Docker restarts the container;
- `down -v`: no container, network or volume of the project left.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from xllm.natsd import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = f"xllmtest{os.getpid()}"
IMAGE = "xllm:latest"
LOCAL_BASES = ("xllm-base:bookworm", "xllm-base:bookworm-build")
BUILD_TIMEOUT_S = 1800  # a cold build: ~5 min here (the base images 1, the image 3-4)
READY_TIMEOUT_S = 600  # three workers loading the model on a small shared machine: ~1.5 min here
REQUEST_TIMEOUT_S = 120


# ---- plumbing --------------------------------------------------------------------------------------


def run(argv: list[str], timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` exited {result.returncode}:\n{(result.stderr + result.stdout)[-4000:]}")
    return result


def wait_for(check, within: float, what: str, every: float = 0.5):
    """check()'s first truthy value, asking every `every` s; fails after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within:.0f} s: {what}")
        time.sleep(every)


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def compose_tool() -> list[str] | None:
    """`docker compose` (v2) where there is one, else `docker-compose` (1.x)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def http(url: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""


def chat(content: str, **extra) -> dict:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "temperature": 0,
        **extra,
    }


# ---- the daemon and the system ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A Docker daemon for the module: the running one, or a `dockerd` started here and stopped after."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    if docker_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon is running, and starting one needs root")
    if shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon is running and no dockerd to start (apt-get install docker.io)")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not docker_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                pytest.skip(f"dockerd did not start (storage driver, cgroups?):\n{tail}")
            time.sleep(0.5)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # dockerd stops the containerd it started, then itself
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass
class System:
    compose: list[str]  # the compose command for this project
    env: dict[str, str]
    url: str
    nats_url: str

    def containers(self, service: str | None = None) -> list[str]:
        out = run([*self.compose, "ps", "-q", *([service] if service else [])], 60, self.env).stdout
        return out.split()

    def instances(self) -> list[dict]:
        status, body = http(f"{self.url}/admin/instances", timeout=10)
        return json.loads(body) if status == 200 else []

    def logs(self) -> str:
        return run([*self.compose, "logs", "--no-color", "--tail", "60"], 60, self.env, check=False).stdout


def inspect(container: str, template: str) -> str:
    return run(["docker", "inspect", "-f", template, container], 30).stdout.strip()


def metric(container: str, name: str) -> float:
    """A worker's counter, read from its /metrics inside its container (the port is not published)."""
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9400/metrics', timeout=5).read().decode())"
    text = run(["docker", "exec", container, "python", "-c", code], 60).stdout
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name)


@pytest.fixture(scope="module")
def system(docker):
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLLM_")}  # the host's settings stay out
    gateway_port, nats_port = free_port(), free_port()
    env |= {
        "XLLM_GATEWAY_PORT": str(gateway_port),
        "XLLM_NATS_PORT": str(nats_port),
        "XLLM_WORKER_THREADS": "1",  # three workers on a small machine
        "XLLM_KV_CACHE_MEMORY": str(256 << 20),
        "XLLM_ROUTER_MODE": "disaggregated",  # every request prefill -> decode: the KV crosses containers
    }
    if shutil.which("debootstrap") and os.geteuid() == 0:
        run([str(ROOT / "deploy" / "local-base.sh"), *LOCAL_BASES], 900)
        base, builder = LOCAL_BASES
        env |= {"XLLM_BASE_IMAGE": base, "XLLM_BUILDER_IMAGE": builder, "XLLM_TORCH_PIP_ARGS": "--find-links /wheels"}
    compose = [*tool, "-f", str(ROOT / "compose.yaml"), "-p", PROJECT]
    system = System(compose, env, f"http://127.0.0.1:{gateway_port}", f"nats://127.0.0.1:{nats_port}")
    try:
        run([*compose, "up", "-d", "--build", "--scale", "decode=2"], BUILD_TIMEOUT_S, env)
        # The image this build replaced, now untagged (the builder stage's layers stay: they are the cache)
        run(["docker", "image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=xllm"], 120)
        try:
            wait_for(lambda: http(f"{system.url}/health", timeout=5)[0] == 200, READY_TIMEOUT_S, "/health 200")
            wait_for(
                lambda: (
                    sorted(i["role"] for i in system.instances() if i["state"] == "ready")
                    == ["decode", "decode", "prefill"]
                ),
                60,
                "1 prefill and 2 decode workers registered",
            )
        except BaseException:
            print(system.logs())
            raise
        yield system
    finally:
        run([*compose, "down", "-v", "--remove-orphans", "-t", "10"], 300, env, check=False)


# ---- the tests, in the order they run --------------------------------------------------------------


def test_every_service_healthy_unprivileged_and_with_its_kernels(system):
    containers = system.containers()
    assert len(containers) == 7, "nats, kvcache, router, gateway, prefill, 2 x decode"
    wait_for(
        lambda: all(inspect(c, "{{.State.Health.Status}}") == "healthy" for c in containers),
        120,
        "every container's health check passes",
        every=2,
    )
    for c in containers:
        assert run(["docker", "exec", c, "id", "-u"], 30).stdout.strip() == "10001"
    # The kernels were compiled in the builder stage for this CPU, and load without a compiler here.
    for c in system.containers("prefill") + system.containers("decode"):
        logs = run(["docker", "logs", c], 60)
        assert "cpu_kernels_unavailable" not in logs.stdout + logs.stderr
    has_compiler = run(
        ["docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c", "command -v g++ c++ cc"], 60, check=False
    )
    assert has_compiler.returncode != 0, f"a compiler in the final image: {has_compiler.stdout}"
    size = int(inspect(IMAGE, "{{.Size}}"))
    print(f"image {IMAGE}: {size / 1e9:.2f} GB")
    assert size < 2e9, "the image should stay lean (torch's CPU build and the venv: ~1.4 GB)"


def test_chat_completion_through_the_published_port(system):
    status, body = http(f"{system.url}/v1/chat/completions", chat("What is the capital of France?"))
    assert status == 200, body
    reply = json.loads(body)
    assert reply["choices"][0]["message"]["content"].strip()
    assert reply["usage"]["completion_tokens"] > 0


def test_streamed_chat_completion(system):
    body = chat("Count to five.", stream=True, stream_options={"include_usage": True})
    request = urllib.request.Request(
        f"{system.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text, events, done = "", [], False
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[len("data: ") :])
            events.append(event)
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
    assert done and text.strip() and len(events) > 2
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_the_kv_crossed_from_the_prefill_container_to_a_decode_container(system):
    (prefill,) = system.containers("prefill")
    decodes = system.containers("decode")
    # The decode workers are other hosts to the prefill worker: the KV went over TCP, to "prefill:9300".
    hosts = {i["role"]: i["host"] for i in system.instances()}
    assert hosts["prefill"] == "prefill" and hosts["decode"] != "prefill"
    sent = metric(prefill, "xllm_kv_transfer_bytes_total")
    received = sum(metric(d, "xllm_kv_transfer_bytes_total") for d in decodes)
    assert sent > 0 and received == sent, (sent, received)
    assert metric(prefill, "xllm_worker_requests_total") >= 2, "both requests so far were split"


def test_offline_job_submitted_over_nats_from_outside(system, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat("Say hi.")},
        {
            "custom_id": "text",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "smollm2", "prompt": "The sky is", "max_tokens": 8, "temperature": 0},
        },
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [sys.executable, "-m", "xllm.cli", "submit", str(jobs), "--nats", system.nats_url, "--wait"]
    result = run([*argv, "--timeout", str(REQUEST_TIMEOUT_S)], REQUEST_TIMEOUT_S + 30)
    results = {r["custom_id"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(results) == {"chat", "text"}, result.stdout
    for r in results.values():
        assert r["error"] is None and r["response"]["status_code"] == 200, r


def test_a_killed_decode_worker_leaves_a_request_served_and_is_restarted(system):
    victim = next(i for i in system.instances() if i["role"] == "decode")
    container = next(c for c in system.containers("decode") if c.startswith(victim["host"]))
    kill = f"import os, signal; os.kill({victim['pid']}, signal.SIGKILL)"
    run(["docker", "exec", container, "python", "-c", kill], 30)

    # The router fails over to the other decode worker; a 503 while it has not yet seen the death
    # (its registry entry expires within seconds) is retried, as a client would.
    statuses: list[int] = []

    def served() -> bool:
        status, body = http(f"{system.url}/v1/chat/completions", chat("Name a colour."))
        statuses.append(status)
        return status == 200 and bool(json.loads(body)["choices"][0]["message"]["content"].strip())

    wait_for(served, 60, "a request served after a decode worker died", every=1)
    print(f"statuses after the kill: {statuses}")
    assert all(s in (200, 503) for s in statuses), statuses
    # Its container exited with the worker (tini is PID 1) and `restart: unless-stopped` brings it back.
    wait_for(lambda: int(inspect(container, "{{.RestartCount}}")) >= 1, 60, "the container restarted")


def test_down_leaves_nothing(system):
    run([*system.compose, "down", "-v", "--remove-orphans", "-t", "10"], 300, system.env)
    label = f"label=com.docker.compose.project={PROJECT}"
    for what in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        left = run(["docker", *what, "-q", "--filter", label], 30).stdout.split()
        assert not left, f"docker {' '.join(what)}: {left} left by the project"

"""`xllm up` as a real process tree on this machine, for integration tests and benchmarks."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from xllm.natsd import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class System:
    url: str
    nats_url: str
    state_dir: Path
    proc: subprocess.Popen

    def instances(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/admin/instances", timeout=5) as r:
            return json.loads(r.read())

    def log(self, name: str) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_system(state_dir: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> System:
    """`xllm up ARGS` with its state and logs in `state_dir`; `env`: variables its processes get besides ours."""
    port = free_port()
    launcher_log = open(state_dir / "launcher.log", "wb")  # noqa: SIM115 -- the child keeps it
    argv = [sys.executable, "-m", "xllm.cli", "up", "--port", str(port), "--state-dir", str(state_dir), *args]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=launcher_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        return _wait_up(proc, state_dir, port, timeout)
    except BaseException:  # not up in time, or Ctrl-C meanwhile: leave no process behind
        stop_system(proc)
        raise


def _wait_up(proc: subprocess.Popen, state_dir: Path, port: int, timeout: float) -> System:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        text = (state_dir / "launcher.log").read_text(errors="replace")
        if "xllm is up" in text:
            nats_url = next(json.loads(line)["url"] for line in text.splitlines() if "nats_started" in line)
            return System(url, nats_url, state_dir, proc)
        if proc.poll() is not None:
            raise RuntimeError(f"xllm up exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"xllm up not healthy within {timeout}s; logs in {state_dir}")


def stop_system(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_serve_argv(url: str, out: Path, name: str, *args: str) -> list[str]:
    """`xllm bench serve ARGS` against `url`, writing `out/name.json` (no plots, no progress bar)."""
    return [
        *(sys.executable, "-m", "xllm.cli", "bench", "serve", "--base-url", url, "--no-plots", "--no-progress"),
        *("--result-dir", str(out), "--result-name", name, *args),
    ]


def bench_serve(url: str, out: Path, name: str, *args: str) -> dict:
    """Run `bench_serve_argv`; the summary of its load point."""
    subprocess.run(bench_serve_argv(url, out, name, *args), cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"{name}.json").read_text())["runs"][0]["summary"]

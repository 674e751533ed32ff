"""`xllm up` stopped with SIGTERM stops every process it started, NATS last, and leaves none behind."""

import subprocess

import pytest

from tests.conftest import SMALL_SYSTEM
from xllm.bench.local_system import start_system, stop_system

pytestmark = pytest.mark.integration


def test_sigterm_stops_everything_and_leaves_no_process(tmp_path):
    system = start_system(tmp_path, *SMALL_SYSTEM, "--mode", "colocated", "--decode", "1")
    try:
        children = subprocess.run(["pgrep", "-f", system.nats_url], capture_output=True, text=True).stdout.split()
        assert len(children) >= 4  # kvcache, router, the worker, gateway
    finally:
        stop_system(system.proc)
    assert system.proc.returncode == 0
    left = subprocess.run(["pgrep", "-f", system.nats_url], capture_output=True, text=True).stdout.split()
    assert left == [], f"orphans: {left}"
    port = system.nats_url.rsplit(":", 1)[1]
    assert subprocess.run(["pgrep", "-f", f"nats-server.*-p {port}"], capture_output=True).returncode == 1

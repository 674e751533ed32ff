"""Faults on a running system: a worker killed with SIGKILL, the kvcache service restarted."""

import asyncio
import os
import signal
import subprocess
import time

import aiohttp
import pytest

from shared import subjects
from shared.bench.local_system import start_system, stop_system
from shared.bus import connect, request
from shared.messages import KvQuery, KvQueryReply
from tests.conftest import SMALL_SYSTEM

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    """Two colocated workers, so one can die while the other serves."""
    system = start_system(tmp_path_factory.mktemp("xllm-colocated"), *SMALL_SYSTEM, "--mode", "colocated",
                          "--decode", "2")
    try:
        yield system
    finally:
        stop_system(system.proc)


async def ask(session, url: str, content: str, max_tokens: int = 8) -> int:
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
               "temperature": 0}
    async with session.post(f"{url}/v1/chat/completions", json=payload) as r:
        body = await r.read()
        if r.status != 200:
            print(f"{r.status}: {body.decode(errors='replace')}")  # shown when the test fails
        return r.status


async def test_killed_worker_leaves_the_pool_and_requests_keep_succeeding(colocated):
    workers = colocated.instances()
    assert len(workers) == 2
    victim = workers[0]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    async with aiohttp.ClientSession() as s:
        statuses = [await ask(s, colocated.url, f"Say a word about {i}.") for i in range(6)]
        while victim["instance_id"] in [i["instance_id"] for i in colocated.instances()]:
            assert time.monotonic() - killed_at < 8, "the dead worker is still in the pool"
            await asyncio.sleep(0.25)
        left_after = time.monotonic() - killed_at
        statuses += [await ask(s, colocated.url, f"Name a color, {i}.") for i in range(4)]
    assert statuses == [200] * 10
    assert left_after < 8
    assert "service_exited_restarting" in (colocated.state_dir / "launcher.log").read_text()


async def test_kvcache_index_answers_the_same_after_a_restart(colocated):
    from shared.engine.loader import load_tokenizer

    tokenizer, _ = load_tokenizer("smollm2")
    messages = [{"role": "user", "content": "Tell me about the history of the printing press. " * 6}]
    async with aiohttp.ClientSession() as s:
        assert await ask(s, colocated.url, messages[0]["content"], max_tokens=4) == 200
    prompt = tokenizer.encode_chat(messages)
    nc = await connect(colocated.nats_url, "test-kvcache")
    try:
        query = KvQuery("q", prompt, 16)
        before = None
        for _ in range(40):  # events are published asynchronously
            before = await request(nc, subjects.KVCACHE_QUERY, query, KvQueryReply, timeout=5)
            if before.matches:
                break
            await asyncio.sleep(0.25)
        assert before.matches and max(before.matches.values()) >= len(prompt) // 16 - 1
        pid = int(subprocess.check_output(["pgrep", "-f", f"services.kvcache --nats {colocated.nats_url}"]).split()[0])
        os.kill(pid, signal.SIGKILL)
        after = None
        for _ in range(120):
            await asyncio.sleep(0.25)
            try:
                after = await request(nc, subjects.KVCACHE_QUERY, query, KvQueryReply, timeout=2)
                break
            except Exception:
                continue
        assert after is not None and after.matches == before.matches
    finally:
        await nc.close()


def test_sigterm_stops_everything_and_leaves_no_process(colocated):
    # runs last in this module: it takes the module's system down
    children = subprocess.run(["pgrep", "-f", colocated.nats_url], capture_output=True, text=True).stdout.split()
    assert len(children) >= 5  # kvcache, router, 2 workers, gateway
    stop_system(colocated.proc)
    assert colocated.proc.returncode == 0
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", colocated.nats_url], capture_output=True, text=True).stdout.split()
    assert left == [], f"orphans: {left}"
    port = colocated.nats_url.rsplit(":", 1)[1]
    assert subprocess.run(["pgrep", "-f", f"nats-server.*-p {port}"], capture_output=True).returncode == 1

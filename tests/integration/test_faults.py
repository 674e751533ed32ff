"""Faults on a running system: a worker killed with SIGKILL, the kvcache service restarted, NATS killed
under load, and the whole system stopped with SIGTERM."""

import asyncio
import os
import signal
import subprocess
import time

import aiohttp
import pytest

from shared import subjects
from shared.bus import connect, request
from shared.jobs import iter_results, make_job
from shared.messages import JobDone, JobRequest, KvQuery, KvQueryReply
from tests.integration.streams import completion_stream
from tests.waiting import until

pytestmark = pytest.mark.integration


async def ask(session, url: str, content: str, max_tokens: int = 8) -> int:
    payload = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    async with session.post(f"{url}/v1/chat/completions", json=payload) as r:
        body = await r.read()
        if r.status != 200:
            print(f"{r.status}: {body.decode(errors='replace')}")  # shown when the test fails
        return r.status


async def test_killed_worker_leaves_the_pool_and_requests_keep_succeeding(xllm_colocated):
    system = xllm_colocated
    workers = system.instances()
    assert len(workers) == 2
    victim = workers[0]
    os.kill(victim["pid"], signal.SIGKILL)
    async with aiohttp.ClientSession() as s:
        statuses = [await ask(s, system.url, f"Say a word about {i}.") for i in range(6)]
        left_after = await until(
            lambda: victim["instance_id"] not in [i["instance_id"] for i in system.instances()],
            8,
            "the dead worker is still in the pool",
        )
        statuses += [await ask(s, system.url, f"Name a color, {i}.") for i in range(4)]
    assert statuses == [200] * 10
    assert left_after < 8
    assert "service_exited_restarting" in (system.state_dir / "launcher.log").read_text()


async def kv_matches(nc, prompt: list[int]) -> dict[str, int]:
    return (await request(nc, subjects.KVCACHE_QUERY, KvQuery("q", prompt, 16), KvQueryReply, timeout=5)).matches


async def test_kvcache_index_answers_the_same_after_a_restart(xllm_colocated):
    from shared.model_files import load_tokenizer

    system = xllm_colocated
    tokenizer, _ = load_tokenizer("smollm2")
    messages = [{"role": "user", "content": "Tell me about the history of the printing press. " * 6}]
    async with aiohttp.ClientSession() as s:
        assert await ask(s, system.url, messages[0]["content"], max_tokens=4) == 200
    prompt = tokenizer.encode_chat(messages)
    nc = await connect(system.nats_url, "test-kvcache")
    try:
        # events are published asynchronously
        await until(lambda: kv_matches(nc, prompt), 10, "the index never learned the prompt")
        before = await kv_matches(nc, prompt)
        assert max(before.values()) >= len(prompt) // 16 - 1
        pid = int(subprocess.check_output(["pgrep", "-f", f"services.kvcache --nats {system.nats_url}"]).split()[0])
        os.kill(pid, signal.SIGKILL)
        after = {}

        async def answers() -> bool:
            nonlocal after
            try:
                after = await kv_matches(nc, prompt)
                return True
            except Exception:  # not restarted yet
                return False

        await until(answers, 30, "the kvcache service did not come back")
        assert after == before
    finally:
        await nc.close()


async def test_nats_killed_under_load_every_request_finishes_and_jobs_and_the_index_survive(xllm_system):
    """SIGKILL the embedded nats-server while requests stream and a job runs: `xllm up` restarts it on
    the same port and store; every stream finishes with all its tokens, the job completes, the KV index
    keeps what it knew and goes on learning."""
    from shared.model_files import load_tokenizer

    system = xllm_system
    tokenizer, _ = load_tokenizer("smollm2")
    known = "Tell me everything about lighthouses and the people who kept them. " * 5
    job = make_job(
        [
            JobRequest(
                f"j{i}",
                "/v1/completions",
                {"model": "smollm2", "prompt": f"Fact {i}:", "max_tokens": 48, "ignore_eos": True},
            )
            for i in range(4)
        ]
    )
    nc = await connect(system.nats_url, "test-nats-kill")
    timeout = aiohttp.ClientTimeout(total=300)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s:
            assert await ask(s, system.url, known, max_tokens=2) == 200
            known_ids = tokenizer.encode_chat([{"role": "user", "content": known}])
            await until(lambda: kv_matches(nc, known_ids), 10, "the index never learned the prompt")
            index_before = await kv_matches(nc, known_ids)
            await nc.jetstream().publish(subjects.JOBS_SUBMIT, job.encode(), headers={"Nats-Msg-Id": job.job_id})

            started = [asyncio.Event() for _ in range(4)]
            streams = [
                asyncio.create_task(completion_stream(s, system.url, f"Chapter {i}:", 160, started[i]))
                for i in range(4)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)  # all streaming now
            port = system.nats_url.rsplit(":", 1)[1]
            pid = int(subprocess.check_output(["pgrep", "-f", f"nats-server -a 127.0.0.1 -p {port}"]).split()[0])
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()

            async def healthy() -> bool:
                async with s.get(f"{system.url}/health") as r:
                    return r.status == 200

            await until(lambda: not os.path.exists(f"/proc/{pid}"), 5, "nats-server survived SIGKILL")
            await until(healthy, 30, "/health never came back")
            health_back = time.monotonic() - killed_at
            results = await asyncio.gather(*streams)
            for r in results:
                assert (r.status, r.errors, r.body) == (200, [], "")
                assert (r.tokens, r.finish_reason) == (160, "length")
            served_at = time.monotonic()
            assert await ask(s, system.url, "Name a river.") == 200
            new_request_s = time.monotonic() - served_at

        async for item in iter_results(nc.jetstream(), job.job_id, timeout=120):
            if isinstance(item, JobDone):
                assert (item.completed, item.failed) == (4, 0)
        assert await kv_matches(nc, known_ids) == index_before  # nothing the index knew was lost
        fresh = "A completely new question about volcanoes and the islands they build, asked twice. " * 4
        async with aiohttp.ClientSession(timeout=timeout) as s:
            assert await ask(s, system.url, fresh, max_tokens=2) == 200
        fresh_ids = tokenizer.encode_chat([{"role": "user", "content": fresh}])
        await until(lambda: kv_matches(nc, fresh_ids), 10, "the index stopped learning after the outage")
    finally:
        await nc.close()
    print(f"NATS SIGKILL -> /health 200 again: {health_back:.2f} s; a new request then took {new_request_s:.2f} s")
    assert "nats_restarted" in (system.state_dir / "launcher.log").read_text()

"""The offline job runner over a real nats-server (JetStream), against the scripted router/worker double."""

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict

import msgpack
import nats
import pytest

from services.gateway import jobs as jobs_module
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.jobs import JobRunner
from shared import bus, subjects
from shared.jobs import iter_results
from shared.messages import SCHEMA_VERSION, GenerateRequest, Job, JobDone, JobRequest, JobResult
from tests.gateway.conftest import MODEL, FakeTokenizer, ScriptedRouter, reply_words
from tests.waiting import until

pytestmark = pytest.mark.integration

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

MakeRunner = Callable[..., Awaitable[JobRunner]]


@pytest.fixture
async def make_runner(nc: nats.NATS, router: ScriptedRouter) -> AsyncIterator[MakeRunner]:
    """make_runner(concurrency=4) -> a started JobRunner (its own Backend) on the durable consumer."""
    made: list[tuple[JobRunner, Backend]] = []

    async def make(concurrency: int = 4) -> JobRunner:
        config = GatewayConfig(first_token_timeout_s=2.0, inter_token_timeout_s=2.0)
        backend = Backend(nc, config.retry_after_s)
        await backend.start()
        runner = JobRunner(nc, backend, FakeTokenizer(), MODEL, config, concurrency=concurrency)
        await runner.start()
        made.append((runner, backend))
        return runner

    yield make
    for runner, backend in made:
        await runner.stop()
        await backend.close()


def job_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def line(cid: str, url: str = CHAT_URL, **body: object) -> dict:
    if url == CHAT_URL:
        body = {"model": "test-model", "messages": MESSAGES, **body}
    else:
        body = {"model": "test-model", "prompt": "ab", **body}
    return asdict(JobRequest(cid, url, body))


async def submit(nc: nats.NATS, job: Job | bytes) -> None:
    data = job if isinstance(job, bytes) else job.encode()
    await nc.jetstream().publish(subjects.JOBS_SUBMIT, data)


async def results(nc: nats.NATS, jid: str, timeout: float = 10.0) -> tuple[dict[str, JobResult], JobDone, int]:
    """({custom_id: result}, the JobDone, number of messages) of a finished job."""
    out: dict[str, JobResult] = {}
    done, count = None, 0
    async for item in iter_results(nc.jetstream(), jid, timeout=timeout):
        count += 1
        if isinstance(item, JobDone):
            done = item
        else:
            assert item.custom_id not in out, f"duplicate result for {item.custom_id}"
            out[item.custom_id] = item
    return out, done, count


async def test_one_result_per_request_then_done_with_per_request_errors(make_runner, router, nc) -> None:
    await make_runner()
    jid = job_id()
    job = Job(
        jid,
        [
            line("chat"),
            line("completion", COMPLETIONS_URL, max_tokens=5),
            line("unknown-model", model="nope"),
            line("bad-param", temperature=-1),
            line("bad-url", "/v1/embeddings"),
            line("streamed", stream=True),
            {"custom_id": "not-a-body", "url": CHAT_URL, "body": ["x"]},
        ],
    )
    await submit(nc, job)
    out, done, count = await results(nc, jid)
    assert count == 8 and done == JobDone(jid, completed=2, failed=5)
    chat = out["chat"].response
    assert out["chat"].error is None and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == "Hello world" and chat["usage"]["completion_tokens"] == 11
    comp = out["completion"].response
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == "Hello world"
    assert out["unknown-model"].error["status"] == 404 and out["unknown-model"].error["type"] == "invalid_request_error"
    assert out["bad-param"].error["status"] == 400 and out["bad-param"].error["param"] == "temperature"
    assert out["bad-url"].error["status"] == 404 and "/v1/embeddings" in out["bad-url"].error["message"]
    assert out["streamed"].error["param"] == "stream"
    assert out["not-a-body"].error["status"] == 400
    # Only the good ones reached the bus, as offline (priority 1) requests.
    assert len(router.requests) == 2 and {r.priority for r in router.requests} == {1}
    assert router.requests[1].params["max_tokens"] == 5 or router.requests[0].params["max_tokens"] == 5


async def test_values_json_cannot_carry_are_refused_by_name(make_runner, router, nc) -> None:
    """A job's bodies come as msgpack, which carries what a JSON body cannot: NaN, integer keys, bytes."""
    await make_runner()
    jid = job_id()
    await submit(
        nc,
        Job(
            jid,
            [
                line("nan-temperature", temperature=math.nan),
                line("inf-max-tokens", max_tokens=math.inf),
                line("int-key-bias", logit_bias={5: 10}),
                line("bytes-content", messages=[{"role": "user", "content": b"hi"}]),
            ],
        ),
    )
    out, done, _ = await results(nc, jid)
    assert done == JobDone(jid, completed=0, failed=4) and not router.requests
    assert {cid: (r.error["status"], r.error["param"]) for cid, r in out.items()} == {
        "nan-temperature": (400, "temperature"),
        "inf-max-tokens": (400, "max_tokens"),
        "int-key-bias": (400, "logit_bias"),
        "bytes-content": (400, "messages[0].content"),
    }


async def test_router_refusals_are_retried(make_runner, router, nc, monkeypatch) -> None:
    await make_runner()
    refused: list[str] = []

    async def busy_once(r: ScriptedRouter, req: GenerateRequest) -> None:
        if not refused:
            refused.append(req.request_id)
            await r.send(req, finished=True, error={"message": "queues full", "type": "overloaded", "status": 429})
            return
        await reply_words()(r, req)

    router.script = busy_once
    jid = job_id()
    await submit(nc, Job(jid, [line("only")]))
    out, done, _ = await results(nc, jid)
    assert done.completed == 1 and out["only"].response["choices"][0]["message"]["content"] == "Hello world"
    assert len(router.requests) == 2


async def test_malformed_jobs_are_acked_and_reported(make_runner, router, nc) -> None:
    runner = await make_runner()
    await submit(nc, b"\xc1 not msgpack")  # no job id to report to: logged and acked
    jid = job_id()
    bad = msgpack.packb({"v": SCHEMA_VERSION, "kind": "job", "job_id": jid, "requests": [{"url": CHAT_URL}]})
    await submit(nc, bad)
    out, done, _ = await results(nc, jid)
    assert done == JobDone(jid, 0, 1) and out[""].error["status"] == 400
    assert "custom_id" in out[""].error["message"]
    dup = job_id()
    await submit(nc, Job(dup, [line("x"), line("x")]))
    out, done, _ = await results(nc, dup)
    assert done.failed == 1 and "used twice" in out[""].error["message"] and not router.requests
    good = job_id()  # the runner goes on
    await submit(nc, Job(good, [line("a")]))
    assert (await results(nc, good))[1].completed == 1

    async def acked() -> bool:  # the ack follows the JobDone
        info = await nc.jetstream().consumer_info(subjects.JOBS_STREAM, jobs_module.DURABLE)
        return runner.jobs_done >= 4 and info.num_ack_pending == 0 and info.num_pending == 0  # none to redeliver

    await until(acked, 20, "the jobs were not all acked")


async def test_a_job_handed_back_mid_way_is_resumed_without_repeats(make_runner, router, nc) -> None:
    first = await make_runner(concurrency=1)
    gate = asyncio.Event()

    async def hold_c2(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.prompt_token_ids[-3] == ord("2") + 3 and not gate.is_set():  # the "c2" prompt, first time
            await gate.wait()
        await reply_words()(r, req)

    router.script = hold_c2
    jid = job_id()
    job = Job(jid, [line(f"c{i}", COMPLETIONS_URL, prompt=f"p{i}ab") for i in (1, 2, 3)])
    await submit(nc, job)
    await until(lambda: len(router.requests) >= 2, 20, "c2 never started")  # c1 done, c2 running
    await first.stop()  # the gateway stops mid-job: the job goes back to the stream (nak)
    assert await router.wait_abort(router.requests[1].request_id)
    gate.set()
    await make_runner(concurrency=1)  # another gateway takes it over
    out, done, count = await results(nc, jid)
    assert done == JobDone(jid, 3, 0) and count == 4 and sorted(out) == ["c1", "c2", "c3"]
    prompts = [bytes(t - 3 for t in r.prompt_token_ids if t >= 3).decode() for r in router.requests]
    assert prompts == ["p1ab", "p2ab", "p2ab", "p3ab"]  # c1 was not run again
    # Run again (a redelivery after the JobDone, or the same job id resubmitted): nothing happens.
    await first.run_job(job.encode(), deliveries=2)
    assert len(router.requests) == 4 and (await results(nc, jid))[2] == 4
    # A result published again under its msg id (two runners raced) is dropped by JetStream.
    await bus.publish(nc.jetstream(), subjects.job_results(jid), out["c1"], msg_id=f"{jid}:c1")
    info = await nc.jetstream().stream_info(subjects.JOB_RESULTS_STREAM, subjects_filter=subjects.job_results(jid))
    assert info.state.subjects[subjects.job_results(jid)] == 4


async def test_a_job_delivered_too_often_fails_what_is_left(make_runner, router, nc, monkeypatch) -> None:
    runner = await make_runner()
    jid = job_id()
    job = Job(jid, [line("a"), line("b")])
    await runner.run_job(job.encode(), deliveries=jobs_module.MAX_DELIVERIES + 1)
    out, done, _ = await results(nc, jid)
    assert done == JobDone(jid, 0, 2) and "delivered" in out["a"].error["message"] and not router.requests

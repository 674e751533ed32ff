"""`xllm submit`: JSONL parsing, batch output lines, and a round trip through a real nats-server against
an in-test job service double (the real runner is tested in tests/gateway/test_jobs.py)."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from shared import bus, subjects
from shared.jobs import make_job
from shared.messages import Job, JobDone, JobResult
from tests.waiting import until
from xllm.submit import JobFileError, batch_line, main, parse_jsonl

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def jsonl(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def req(cid: str, url: str = "/v1/chat/completions", body: object = CHAT, **extra: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body, **extra}


def test_parse_jsonl_reads_openai_batch_lines() -> None:
    lines = jsonl(req("a"), "", "  ", {"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "x"}})
    reqs = parse_jsonl(lines, "jobs.jsonl")
    assert [(r.custom_id, r.url) for r in reqs] == [("a", "/v1/chat/completions"), ("b", "/v1/completions")]
    assert reqs[0].body == CHAT


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (req(""), "custom_id must be a non-empty string"),
        (req("a"), "custom_id 'a' is used twice"),
        (req("b", method="GET"), "method must be POST"),
        (req("b", "/v1/embeddings"), "url must be one of"),
        (req("b", body="hi"), "body must be a JSON object"),
    ],
)
def test_parse_jsonl_names_the_bad_line(bad: object, why: str) -> None:
    with pytest.raises(JobFileError) as e:
        parse_jsonl(jsonl(req("a"), "", bad), "jobs.jsonl")
    assert str(e.value).startswith("jobs.jsonl:3: ") and why in str(e.value)


def test_parse_jsonl_needs_a_request() -> None:
    with pytest.raises(JobFileError, match="no requests"):
        parse_jsonl(["", "\n"], "empty.jsonl")


def test_job_ids() -> None:
    assert make_job(parse_jsonl(jsonl(req("a")))).job_id.startswith("job-")
    with pytest.raises(ValueError, match="job id"):
        make_job(parse_jsonl(jsonl(req("a"))), "bad.id")


def test_batch_line_formats() -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
    assert batch_line(JobResult("j", "a", response=body)) == {
        "id": "j:a",
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "chatcmpl-1", "body": body},
        "error": None,
    }
    err = {
        "message": "The model `x` does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "status": 404,
        "code": "model_not_found",
    }
    line = batch_line(JobResult("j", "b", error=err))
    openai = {"message": err["message"], "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert line["response"] == {"status_code": 404, "request_id": None, "body": {"error": openai}}
    assert line["error"] == {"code": "model_not_found", "message": err["message"]}


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "jobs.jsonl"
    f.write_text(json.dumps(req("a")) + "\n" + json.dumps(req("a")) + "\n")
    assert main([str(f)]) == 2
    assert f"{f}:2: custom_id 'a' is used twice" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main([]) == 2 and "--results" in capsys.readouterr().err
    f.write_text(json.dumps(req("a")) + "\n")
    assert main([str(f), "--job-id", "a.b"]) == 2 and "job id" in capsys.readouterr().err


@pytest.fixture
async def job_service(nc: Client) -> AsyncIterator[list[Job]]:
    """Plays the gateway's job runner for jobs whose id starts with "ct-": custom id "bad" fails."""
    js = nc.jetstream()
    await bus.ensure_streams(js, (bus.JOBS, bus.JOB_RESULTS))
    seen: list[Job] = []

    async def on_job(msg) -> None:
        job = Job.decode(msg.data)
        await msg.ack()
        if not job.job_id.startswith("ct-"):
            return
        seen.append(job)
        for r in job.requests:
            cid = r["custom_id"]
            if cid == "bad":
                result = JobResult(
                    job.job_id, cid, error={"message": "nope", "type": "invalid_request_error", "status": 400}
                )
            else:
                body = {
                    "id": f"chatcmpl-{cid}",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hi {cid}"}}],
                }
                result = JobResult(job.job_id, cid, response=body)
            await js.publish(subjects.job_results(job.job_id), result.encode())
        failed = sum(r["custom_id"] == "bad" for r in job.requests)
        await js.publish(
            subjects.job_results(job.job_id), JobDone(job.job_id, len(job.requests) - failed, failed).encode()
        )

    sub = await js.subscribe(subjects.JOBS_SUBMIT, cb=on_job, manual_ack=True, deliver_policy=DeliverPolicy.NEW)
    yield seen
    await sub.unsubscribe()


@pytest.mark.integration
async def test_round_trip_wait_and_fetch_later(
    nats_server: str, job_service: list[Job], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    f, out = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    f.write_text("\n".join(json.dumps(req(c)) for c in ("a", "bad", "c")) + "\n")
    jid = f"ct-{uuid.uuid4().hex[:8]}"
    code = await asyncio.to_thread(
        main, [str(f), "--nats", nats_server, "--wait", "--output", str(out), "--job-id", jid, "--timeout", "20"]
    )
    assert code == 0
    streams = capsys.readouterr()
    assert streams.out.strip() == jid and f"job {jid}: 2 completed, 1 failed" in streams.err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "bad", "c"]
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"] == "hi a" and lines[0]["error"] is None
    assert lines[1]["response"]["status_code"] == 400 and lines[1]["error"]["message"] == "nope"
    assert job_service[0].requests[0] == {"custom_id": "a", "url": "/v1/chat/completions", "body": CHAT}
    # Later, by id, to stdout (which then holds the results only).
    assert await asyncio.to_thread(main, ["--results", jid, "--nats", nats_server, "--timeout", "20"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines
    # Submitted without --wait: the job id alone; a second publish of the same id is deduped.
    jid2 = f"ct-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        assert await asyncio.to_thread(main, [str(f), "--nats", nats_server, "--job-id", jid2]) == 0
    assert capsys.readouterr().out.split() == [jid2, jid2]
    marker = f"ct-{uuid.uuid4().hex[:8]}"  # the stream delivers in order: once this is seen, jid2's were
    assert await asyncio.to_thread(main, [str(f), "--nats", nats_server, "--job-id", marker]) == 0
    await until(lambda: marker in [j.job_id for j in job_service], 20, "the marker job never arrived")
    assert [j.job_id for j in job_service].count(jid2) == 1


@pytest.mark.integration
async def test_results_wait_times_out_clearly(
    nats_server: str, job_service: list[Job], capsys: pytest.CaptureFixture
) -> None:
    code = await asyncio.to_thread(main, ["--results", "ct-never", "--nats", nats_server, "--timeout", "0.3"])
    assert code == 1 and "not done within 0.3 s" in capsys.readouterr().err


def test_unreachable_nats_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XLLM_NATS_CONNECT_WAIT", "0.5")
    f = tmp_path / "jobs.jsonl"
    f.write_text(json.dumps(req("a")) + "\n")
    assert main([str(f), "--nats", "nats://127.0.0.1:1"]) == 1
    assert "cannot reach NATS" in capsys.readouterr().err

"""The offline workload against a real nats-server (JetStream on), with an in-test job service double.

The double plays the server side only: it creates the job streams, takes each Job from JOBS_SUBMIT,
answers every request with a JobResult (one of them an error) and ends with a JobDone.
"""

import asyncio
import json

import nats
import pytest

from shared.messages import Job, JobDone, JobResult
from shared.subjects import JOB_RESULTS_PREFIX, JOB_RESULTS_STREAM, JOBS_STREAM, JOBS_SUBMIT, job_results
from xllm.bench import serve
from xllm.natsd import NatsServer

pytestmark = pytest.mark.integration


@pytest.fixture
def nats_url(tmp_path):
    with NatsServer(tmp_path) as server:
        yield server.url


async def start_job_service(url: str, fail: set[str]) -> nats.NATS:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=JOBS_STREAM, subjects=[JOBS_SUBMIT])
    await js.add_stream(name=JOB_RESULTS_STREAM, subjects=[f"{JOB_RESULTS_PREFIX}.>"])

    async def on_job(msg) -> None:
        job = Job.decode(msg.data)
        await msg.ack()
        failed = 0
        for line in job.requests:
            body = line["body"]
            assert line["url"] == "/v1/chat/completions" and not body.get("stream")
            await asyncio.sleep(0.02)
            if line["custom_id"] in fail:
                failed += 1
                err = {"message": "bad request", "type": "invalid_request_error"}
                result = JobResult(job.job_id, line["custom_id"], error=err)
            else:
                n = body["max_tokens"]
                usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
                choice = {"index": 0, "message": {"role": "assistant", "content": "x " * n}}
                response = {"choices": [choice], "usage": usage}
                result = JobResult(job.job_id, line["custom_id"], response=response)
            await js.publish(job_results(job.job_id), result.encode())
        done = JobDone(job.job_id, completed=len(job.requests) - failed, failed=failed)
        await js.publish(job_results(job.job_id), done.encode())

    await js.subscribe(JOBS_SUBMIT, cb=on_job, durable="jobs", manual_ack=True)
    return nc


async def test_offline_job_through_jetstream(nats_url, tmp_path):
    service = await start_job_service(nats_url, fail={"req-2"})
    args = [
        "--workload",
        "offline",
        "--nats",
        nats_url,
        "--model",
        "m",
        "--num-prompts",
        "5",
        "--input-len",
        "12",
        "--output-len",
        "7",
        "--ignore-eos",
        "--job-timeout",
        "30",
        "--result-dir",
        str(tmp_path),
        "--result-name",
        "job",
        "--no-progress",
    ]
    try:
        assert await asyncio.wait_for(asyncio.to_thread(serve.main, args), 60) == 0
    finally:
        await service.close()
    doc = json.loads((tmp_path / "job.json").read_text())
    s = doc["runs"][0]["summary"]
    assert s["completed"] == 4 and s["failed"] == 1
    assert s["errors"] == {"job_invalid_request_error": 1}
    assert s["total_output_tokens"] == 4 * 7 and s["total_input_tokens"] == 4 * 5
    job = s["job"]
    assert job["done_received"] and job["done_completed"] == 4 and job["done_failed"] == 1
    assert job["results_received"] == 5
    # 5 results ~20 ms apart: the job takes >= 0.1 s; per-request times grow in result order
    assert 0.1 <= job["completion_time_s"] < 10
    e2e = [r["e2e"] for r in doc["runs"][0]["requests"]]
    assert e2e == sorted(e2e)
    assert (tmp_path / "job-latency-cdf.png").stat().st_size > 0


async def test_offline_without_job_service_is_a_clear_error(nats_url, tmp_path, capsys):
    args = [
        "--workload",
        "offline",
        "--nats",
        nats_url,
        "--model",
        "m",
        "--num-prompts",
        "2",
        "--result-dir",
        str(tmp_path),
        "--no-progress",
    ]
    assert await asyncio.to_thread(serve.main, args) == 2
    assert "job service" in capsys.readouterr().err

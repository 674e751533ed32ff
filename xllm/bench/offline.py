"""The offline workload: one batch job through NATS JetStream, timed from submit to JobDone.

We publish a `Job` (every request as an OpenAI-style body, not streamed) to `JOBS_SUBMIT` with
JetStream, and read the job's results subject with an ordered consumer: one `JobResult` per request,
then a `JobDone`. Each request's "e2e" is the time from submit to its result, so the latency CDF is
the job's completion curve; the run's duration is submit -> JobDone. The streams belong to the server
(its job service creates them); we only publish and read.
"""

import time
import uuid
from contextlib import aclosing
from dataclasses import asdict

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, NotFoundError

from shared import bus
from shared.jobs import iter_results
from shared.messages import Job, JobDone, JobRequest, JobResult
from shared.subjects import JOBS_SUBMIT
from xllm.bench.client import RequestResult, Target, build_payload
from xllm.bench.progress import Progress
from xllm.bench.runner import LoadPoint, RunResult
from xllm.bench.workloads import BenchRequest


class OfflineError(RuntimeError):
    """The job could not be submitted or followed (no NATS, no job streams)."""


def make_job(target: Target, requests: list[BenchRequest]) -> tuple[Job, dict[str, BenchRequest]]:
    url = "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
    by_id = {f"req-{i}": r for i, r in enumerate(requests)}
    lines = [asdict(JobRequest(cid, url, build_payload(r, target, stream=False))) for cid, r in by_id.items()]
    return Job(job_id=f"bench-{uuid.uuid4().hex[:12]}", requests=lines), by_id


def to_result(jr: JobResult, req: BenchRequest, elapsed: float) -> RequestResult:
    res = RequestResult(ok=False, e2e=elapsed, input_len=req.input_len, prompt_tokens=req.input_len)
    if jr.error or not jr.response:
        err = jr.error or {}
        res.error = f"job_{err.get('code') or err.get('type') or 'error'}"
        res.detail = str(err.get("message", ""))[:300]
        return res
    usage = jr.response.get("usage") or {}
    res.ok = True
    res.usage_reported = bool(usage)
    res.output_tokens = res.chunks = int(usage.get("completion_tokens") or 0)
    res.prompt_tokens = int(usage.get("prompt_tokens") or req.input_len)
    return res


async def run_offline(
    nats_url: str, target: Target, requests: list[BenchRequest], timeout_s: float, progress: bool = True
) -> tuple[RunResult, dict]:
    """Submit one job of all requests; returns the run and a `job` summary (ids, JobDone counts)."""
    job, by_id = make_job(target, requests)
    try:
        nc = await bus.connect(nats_url, "xllm-bench", connect_wait_s=5)
    except bus.BusError as e:
        raise OfflineError(str(e)) from e
    bar = Progress(len(requests), f"job {job.job_id}", progress)
    started_at, t0 = time.time(), time.perf_counter()
    try:
        results, done = await _follow(nc.jetstream(), job, by_id, t0, timeout_s, bar)
    finally:
        bar.close()
        await nc.close()
    duration = time.perf_counter() - t0
    received = len(results)
    for cid, req in by_id.items():  # what never came back within the time limit
        if cid not in results:
            results[cid] = RequestResult(ok=False, error="timeout", e2e=duration, input_len=req.input_len)
    summary = {
        "job_id": job.job_id,
        "completion_time_s": duration if done else None,
        "done_received": done is not None,
        "done_completed": done.completed if done else None,
        "done_failed": done.failed if done else None,
        "results_received": received,
    }
    return RunResult(LoadPoint(), [results[c] for c in by_id], duration, started_at), summary


async def _follow(
    js, job: Job, by_id: dict[str, BenchRequest], t0: float, timeout_s: float, bar: Progress
) -> tuple[dict[str, RequestResult], JobDone | None]:
    """Publish the job and read its results until its JobDone or the time limit."""
    try:
        await js.publish(JOBS_SUBMIT, job.encode(), timeout=10)
    except (NoRespondersError, NoStreamResponseError, NatsTimeout) as e:
        raise OfflineError(f"no JetStream stream takes {JOBS_SUBMIT}: is the xllm job service up?") from e
    results: dict[str, RequestResult] = {}
    try:
        async with aclosing(iter_results(js, job.job_id, timeout=timeout_s)) as items:  # closed before nc is
            async for item in items:
                if isinstance(item, JobDone):
                    return results, item
                if item.custom_id in by_id and item.custom_id not in results:  # redeliveries count once
                    results[item.custom_id] = to_result(item, by_id[item.custom_id], time.perf_counter() - t0)
                    bar.update(results[item.custom_id].ok)
    except TimeoutError:
        pass
    except NotFoundError as e:
        raise OfflineError("no JetStream stream holds job results: is the xllm job service up?") from e
    return results, None

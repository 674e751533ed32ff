"""Offline batch jobs on JetStream, the protocol both sides share (docs/jobs.md): job ids, the request
kinds a job may hold, checking a job message, and reading a job's results back.

    client --Job--> xllm.jobs.submit (stream XLLM_JOBS) --> a gateway's job runner
    runner --JobResult per request, then JobDone--> xllm.jobs.results.<job_id> (stream XLLM_JOB_RESULTS)
"""

import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import asdict
from typing import Any

import msgpack
import nats.errors

from shared import subjects
from shared.messages import Job, JobDone, JobRequest, JobResult, SchemaError

URLS = ("/v1/chat/completions", "/v1/completions")
# A job id is one subject token and the prefix of result msg ids ("<job_id>:<custom_id>"): no dots,
# wildcards, spaces or colons.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
READ_WAIT_S = 5.0  # the longest gap between two messages of a stream that is known to hold them


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"


def make_job(requests: list[JobRequest], job_id: str | None = None) -> Job:
    job_id = job_id or new_job_id()
    if not JOB_ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r}: use 1-128 letters, digits, '-' or '_'")
    return Job(job_id, [asdict(r) for r in requests])


def decode_result(data: bytes) -> JobResult | JobDone:
    """A message of a job's results subject (SchemaError if it is neither kind)."""
    try:
        kind = msgpack.unpackb(data, raw=False).get("kind")
    except Exception as e:
        raise SchemaError(f"not a msgpack map: {e}") from e
    return JobDone.decode(data) if kind == JobDone.kind else JobResult.decode(data)


async def iter_results(
    js: Any, job_id: str, *, limit: int | None = None, timeout: float | None = None
) -> AsyncIterator[JobResult | JobDone]:
    """The job's results from the start of the stream, up to its JobDone (or `limit` messages).

    TimeoutError when `timeout` seconds pass before the end. Messages that do not decode are skipped.
    """
    sub = await js.subscribe(subjects.job_results(job_id), stream=subjects.JOB_RESULTS_STREAM, ordered_consumer=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        read = 0
        while limit is None or read < limit:
            wait = READ_WAIT_S if limit is not None else 3600.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"job {job_id}: not done within {timeout:g} s")
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                if limit is not None:
                    raise TimeoutError(f"job {job_id}: results stream stalled") from None
                continue
            read += 1
            try:
                item = decode_result(msg.data)
            except SchemaError:
                continue
            yield item
            if isinstance(item, JobDone):
                return
    finally:
        await sub.unsubscribe()


class JobError(ValueError):
    """The job as a whole is malformed (reported as one error result with custom_id "")."""


def parse_job(data: bytes) -> tuple[str, list[JobRequest]]:
    """(job id, requests) of a Job message; JobError when it cannot be run at all."""
    try:
        job = Job.decode(data)
    except SchemaError as e:
        raise JobError(str(e)) from None
    if not isinstance(job.job_id, str) or not JOB_ID_RE.match(job.job_id):
        raise JobError(f"job_id {job.job_id!r}: use 1-128 letters, digits, '-' or '_'")
    if not isinstance(job.requests, list):
        raise JobError("requests must be a list of {custom_id, url, body} maps")
    lines, seen = [], set()
    for i, item in enumerate(job.requests):
        cid = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not cid:
            raise JobError(f"requests[{i}]: custom_id must be a non-empty string")
        if cid in seen:
            raise JobError(f"requests[{i}]: custom_id {cid!r} is used twice")
        seen.add(cid)
        lines.append(JobRequest(cid, item.get("url"), item.get("body")))  # checked when run: a bad one fails alone
    return job.job_id, lines


def salvage_job_id(data: bytes) -> str | None:
    """The job id of a message too broken to run, if it has a usable one (to report the error)."""
    with suppress(Exception):
        job_id = msgpack.unpackb(data, raw=False).get("job_id")
        if isinstance(job_id, str) and JOB_ID_RE.match(job_id):
            return job_id
    return None

"""`xllm submit`: an offline batch job over NATS JetStream (docs/jobs.md has the protocol).

    xllm submit jobs.jsonl [--nats URL] [--wait] [--output FILE] [--job-id ID] [--timeout S]
    xllm submit --results JOB_ID [--nats URL] [--output FILE] [--timeout S]

jobs.jsonl is OpenAI's batch input format, one request a line:
    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
The job goes to `xllm.jobs.submit` (stream XLLM_JOBS); a gateway's job runner takes it and publishes a
JobResult per request, then a JobDone, to `xllm.jobs.results.<job_id>` (stream XLLM_JOB_RESULTS).
With --wait (or --results) those are read back and written as OpenAI batch output lines:
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}

The job protocol itself (ids, results, reading them back) is shared/jobs.py, the job runner's too.
"""

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

import nats.errors
import nats.js.errors

from shared import bus, subjects
from shared.errors import ApiError
from shared.jobs import URLS, iter_results, make_job
from shared.messages import Job, JobDone, JobRequest, JobResult


class JobFileError(ValueError):
    """A JSONL line that is not a valid batch request; the message starts with `file:line:`."""


def parse_jsonl(lines: Iterable[str], name: str = "<input>") -> list[JobRequest]:
    """OpenAI batch input lines -> JobRequests; JobFileError names the first bad line."""
    out: list[JobRequest] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise JobFileError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise JobFileError(f"{where}: expected a JSON object with custom_id, method, url, body")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise JobFileError(f"{where}: custom_id must be a non-empty string")
        if cid in seen:
            raise JobFileError(f"{where}: custom_id {cid!r} is used twice; each request needs its own")
        if obj.get("method", "POST") != "POST":
            raise JobFileError(f"{where}: method must be POST, got {obj.get('method')!r}")
        if obj.get("url") not in URLS:
            raise JobFileError(f"{where}: url must be one of {', '.join(URLS)}, got {obj.get('url')!r}")
        if not isinstance(obj.get("body"), dict):
            raise JobFileError(f"{where}: body must be a JSON object (the request body)")
        seen.add(cid)
        out.append(JobRequest(cid, obj["url"], obj["body"]))
    if not out:
        raise JobFileError(f"{name}: no requests in the file")
    return out


def batch_line(result: JobResult) -> dict[str, Any]:
    """A JobResult as an OpenAI batch output line. A failed request has both a response with its HTTP
    status and error body (as OpenAI reports HTTP errors) and `error` {code, message}, for grep."""
    if result.error is None:
        body = result.response or {}
        response = {"status_code": 200, "request_id": body.get("id"), "body": body}
        error = None
    else:
        err = result.error
        api_error = ApiError.from_wire(err)
        response = {"status_code": api_error.status, "request_id": None, "body": api_error.body()}
        error = {"code": api_error.code or api_error.type, "message": api_error.message}
    return {
        "id": f"{result.job_id}:{result.custom_id}",
        "custom_id": result.custom_id,
        "response": response,
        "error": error,
    }


# -- the command ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if (args.file is None) == (args.results is None):
        print("xllm submit: give a JSONL file, or --results JOB_ID", file=sys.stderr)
        return 2
    job = None
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                job = make_job(parse_jsonl(f, args.file), args.job_id)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            print(f"xllm submit: {e}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_run(args, job))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xllm submit",
        description="run an offline batch job (OpenAI batch "
        "JSONL) through the xllm job runner over NATS; see docs/jobs.md",
    )
    p.add_argument("file", nargs="?", help="JSONL file, one {custom_id, method, url, body} per line")
    p.add_argument(
        "--nats", default=os.environ.get("XLLM_NATS", "nats://127.0.0.1:4222"), help="NATS server URL [env XLLM_NATS]"
    )
    p.add_argument("--wait", action="store_true", help="wait for the results and write them")
    p.add_argument("--output", "-o", help="write results here (default: stdout)")
    p.add_argument("--job-id", help="the job's id (default: a random one); letters, digits, - and _")
    p.add_argument("--results", metavar="JOB_ID", help="fetch the results of an earlier job")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the job to finish")
    return p


async def _run(args: argparse.Namespace, job: Job | None) -> int:
    try:
        nc = await bus.connect(args.nats, name="xllm-submit")  # waits XLLM_NATS_CONNECT_WAIT (10 s) at most
    except bus.BusError as e:
        print(f"xllm submit: {e}", file=sys.stderr)
        return 1
    try:
        js = nc.jetstream()
        job_id = args.results
        to_stdout = not args.output
        if job is not None:
            job_id = job.job_id
            data = job.encode()
            if len(data) > nc.max_payload:
                print(
                    f"xllm submit: the job is {len(data)} bytes, over the NATS message limit of "
                    f"{nc.max_payload}; split the file into several jobs",
                    file=sys.stderr,
                )
                return 2
            try:  # the msg id makes a retried publish of the same job a no-op
                await js.publish(subjects.JOBS_SUBMIT, data, timeout=10, headers={"Nats-Msg-Id": job_id})
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                print(
                    f"xllm submit: no JetStream stream takes {subjects.JOBS_SUBMIT}; is an xllm gateway "
                    "running against this NATS?",
                    file=sys.stderr,
                )
                return 1
            # Results on stdout: the job id goes to stderr, so stdout stays pure JSONL.
            print(job_id, file=sys.stderr if args.wait and to_stdout else sys.stdout, flush=True)
            if not args.wait:
                return 0
        return await _write_results(js, job_id, args.output, args.timeout)
    finally:
        await nc.close()


async def _write_results(js: Any, job_id: str, output: str | None, timeout: float | None) -> int:
    out: IO[str] = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    seen: set[str] = set()
    done: JobDone | None = None
    try:
        async for item in iter_results(js, job_id, timeout=timeout):
            if isinstance(item, JobDone):
                done = item
            elif item.custom_id not in seen:  # a redelivered job may repeat a result
                seen.add(item.custom_id)
                out.write(json.dumps(batch_line(item), ensure_ascii=False) + "\n")
                out.flush()
    except TimeoutError as e:
        print(f"xllm submit: {e} ({len(seen)} results so far)", file=sys.stderr)
        return 1
    except nats.js.errors.NotFoundError:
        print(f"xllm submit: no stream {subjects.JOB_RESULTS_STREAM}; is an xllm gateway running?", file=sys.stderr)
        return 1
    finally:
        if output:
            out.close()
    print(f"job {job_id}: {done.completed} completed, {done.failed} failed", file=sys.stderr)
    return 0

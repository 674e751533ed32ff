"""The offline job runner: batch jobs from JetStream, run at low priority, results back to JetStream.

    client --Job--> xllm.jobs.submit (stream XLLM_JOBS) --durable pull consumer "xllm-jobs"--> a gateway
    gateway --JobResult per request, then JobDone--> xllm.jobs.results.<job_id> (stream XLLM_JOB_RESULTS)

Every gateway replica binds the same durable consumer, so each job goes to one of them. A gateway runs
one job at a time, `concurrency` of its requests in flight, each parsed as the REST API parses it
(chat.py, completion.py: the one place that templates and tokenizes) and sent the same way (failover
included) with priority 1: the engines schedule online requests first. Router refusals (429 / 503) are retried
with backoff until `RETRY_FOR_S`: an offline request waits for room rather than fail.

The job message is acked only once all its results and its JobDone are published; until then the
runner marks it in progress, so a gateway that dies mid-job leaves it to be redelivered after
`ACK_WAIT_S`. A job is resumable: before running it, the runner reads what its results subject
already holds and runs only the requests without a result (nothing if a JobDone is there). Results
carry msg ids "<job_id>:<custom_id>" (JobDone: "<job_id>"), so JetStream drops a duplicate published
within its dedupe window by two runners that raced on one job.
"""

import asyncio
import time
import uuid
from contextlib import aclosing, suppress
from typing import Any

import nats.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.gateway import responses as R
from services.gateway.backend import Backend
from services.gateway.chat import parse_chat
from services.gateway.completion import parse_completion
from services.gateway.config import GatewayConfig
from services.gateway.generation import Generation
from services.gateway.multimodal import PreparedImage, load_images
from services.gateway.protocol import ModelInfo, ParsedRequest
from shared import bus, subjects
from shared.errors import ApiError, internal, invalid
from shared.jobs import URLS, JobError, iter_results, parse_job, salvage_job_id
from shared.messages import GenerateRequest, JobDone, JobRequest, JobResult
from shared.retry import every, retry

log = structlog.get_logger("xllm.gateway.jobs")

DURABLE = "xllm-jobs"
ACK_WAIT_S = 60.0  # a job not marked in progress for this long is redelivered (its gateway died)
PROGRESS_EVERY_S = 15.0
FETCH_WAIT_S = 5.0
MAX_DELIVERIES = 20  # a job redelivered this often (it keeps killing gateways?) fails what is left
RETRY_FOR_S = 600.0  # how long an offline request keeps retrying router refusals (429 / 503)
PUBLISH_FOR_S = 60.0  # how long a result waits for NATS to come back before the job is handed back
OFFLINE_PRIORITY = 1
PARSERS = dict(zip(URLS, (parse_chat, parse_completion)))


class JobRunner:
    def __init__(
        self,
        nc: Any,
        backend: Backend,
        tokenizer: Any,
        model: ModelInfo,
        config: GatewayConfig,
        concurrency: int | None = None,
    ):
        self.nc, self.js = nc, nc.jetstream()
        self.backend, self.tokenizer, self.model, self.config = backend, tokenizer, model, config
        self.concurrency = concurrency or config.job_concurrency or 16
        self.jobs_done = 0
        self._sub: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await bus.ensure_streams(self.js, (bus.JOBS, bus.JOB_RESULTS))
        consumer = ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S,
            max_deliver=-1,
        )
        self._sub = await self.js.pull_subscribe(
            subjects.JOBS_SUBMIT, durable=DURABLE, stream=subjects.JOBS_STREAM, config=consumer
        )
        self._task = asyncio.create_task(self._loop(), name="job-runner")
        log.info("job_runner_started", subject=subjects.JOBS_SUBMIT, concurrency=self.concurrency)

    async def stop(self) -> None:
        """Stop taking jobs; a job in progress is handed back (nak) for another gateway to resume."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            with suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _loop(self) -> None:
        while True:
            # NATS reconnecting, consumer gone...: try again shortly; no job waiting is no failure
            msgs = await retry(self._fetch, "job_fetch", delay=1.0, max_delay=1.0)
            for msg in msgs:
                await self._handle(msg)

    async def _fetch(self) -> list:
        try:
            return await self._sub.fetch(1, timeout=FETCH_WAIT_S)
        except nats.errors.TimeoutError:
            return []

    async def _handle(self, msg: Any) -> None:
        progress = asyncio.create_task(self._keep_in_progress(msg))
        try:
            await self.run_job(msg.data, msg.metadata.num_delivered)
        except asyncio.CancelledError:
            with suppress(Exception):
                await msg.nak()
            raise
        except Exception as e:  # NATS failed under us: hand it back, a later run resumes it
            log.warning("job_failed", error=f"{type(e).__name__}: {e}")
            with suppress(Exception):
                await msg.nak(delay=5.0)
        else:
            await msg.ack()
            self.jobs_done += 1
        finally:
            progress.cancel()

    async def _keep_in_progress(self, msg: Any) -> None:
        await asyncio.sleep(PROGRESS_EVERY_S)
        await every(PROGRESS_EVERY_S, msg.in_progress, "job_in_progress")

    # -- one job ----------------------------------------------------------------------------------

    async def run_job(self, data: bytes, deliveries: int = 1) -> None:
        """Run a job message to its JobDone (resuming what an earlier delivery published)."""
        try:
            job_id, lines = parse_job(data)
        except JobError as e:
            await self._report_bad_job(data, e)
            return
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            previous, done = await self._published(job_id)
            if done:
                log.info("job_already_done", requests=len(lines))
                return
            todo = [line for line in lines if line.custom_id not in previous]
            log.info("job_started", requests=len(lines), resumed=len(previous), delivery=deliveries)
            started = time.monotonic()
            outcomes = dict(previous)
            if deliveries > MAX_DELIVERIES:
                err = internal(f"the job was delivered {deliveries} times without finishing").to_wire()
                for line in todo:
                    outcomes[line.custom_id] = await self._report(job_id, line.custom_id, None, err)
            else:
                outcomes.update(await self._run_lines(job_id, todo))
            failed = sum(not ok for ok in outcomes.values())
            await self._publish(JobDone(job_id, len(outcomes) - failed, failed), job_id)
            log.info(
                "job_done",
                completed=len(outcomes) - failed,
                failed=failed,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _report_bad_job(self, data: bytes, e: JobError) -> None:
        """A job that cannot be run: one error result and its JobDone, when it has an id to report under."""
        job_id = salvage_job_id(data)
        log.warning("bad_job", job_id=job_id, error=str(e))
        if job_id is not None:
            err = invalid(f"malformed job: {e}", code="invalid_job").to_wire()
            await self._publish(JobResult(job_id, "", error=err), f"{job_id}:")
            await self._publish(JobDone(job_id, 0, 1), job_id)

    async def _run_lines(self, job_id: str, lines: list[JobRequest]) -> dict[str, bool]:
        """Run the requests, `concurrency` at a time, publishing each result: {custom_id: succeeded}."""
        outcomes: dict[str, bool] = {}
        pending = iter(lines)

        async def worker() -> None:
            for line in pending:  # shared by the workers: each line goes to one of them
                response, error = await self.run_request(line)
                outcomes[line.custom_id] = await self._report(job_id, line.custom_id, response, error)

        async with asyncio.TaskGroup() as group:  # one failure (NATS gone) stops the others
            for _ in range(min(self.concurrency, len(lines))):
                group.create_task(worker())
        return outcomes

    async def run_request(self, line: JobRequest) -> tuple[dict | None, dict | None]:
        """(response body, None) or (None, error) for one request; refusals retried with backoff."""
        try:
            return await retry(
                lambda: self._generate(line),
                "job_request",
                delay=0.5,
                max_delay=5.0,
                give_up_after=RETRY_FOR_S,
                retry_if=_refused,
            ), None
        except ApiError as e:
            return None, e.to_wire()
        except Exception as e:  # a bug must cost one result, not the job
            log.exception("job_request_crashed", custom_id=line.custom_id)
            return None, internal(f"internal error: {type(e).__name__}").to_wire()

    async def _generate(self, line: JobRequest) -> dict:
        images = []
        if line.url == "/v1/chat/completions" and isinstance(line.body, dict):  # data: URLs only: no fetching here
            images = await load_images(line.body, self.model.name, self.model.vision, self.config.image_limits(), None)
        parsed = await asyncio.get_running_loop().run_in_executor(None, self._parse, line, images)
        rid = f"{'chatcmpl' if parsed.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        req = GenerateRequest(
            rid,
            parsed.prompt_token_ids,
            parsed.params.to_dict(),
            reply_subject="",
            priority=OFFLINE_PRIORITY,
            images=parsed.images,
        )
        n, prompt_len = parsed.params.n, len(parsed.prompt_token_ids)
        col = R.Collector(n, prompt_len)

        def restart() -> None:
            nonlocal col
            col = R.Collector(n, prompt_len)

        cfg = self.config
        with structlog.contextvars.bound_contextvars(request_id=rid):
            async with Generation.open(
                self.backend, req, cfg.first_token_timeout_s, cfg.inter_token_timeout_s, restart
            ) as gen:
                while True:
                    chunk = await gen.next()
                    if chunk.error:
                        raise ApiError.from_wire(chunk.error, cfg.retry_after_s)
                    col.add(chunk)
                    if chunk.finished:
                        break
        return R.response_body(parsed.kind, rid, int(time.time()), self.model.name, col, self.tokenizer, parsed.echo)

    def _parse(self, line: JobRequest, images: list[PreparedImage]) -> ParsedRequest:
        """The REST API's parsing of the body a client would POST (decoded from msgpack: the parsers check
        the type of every field they read, so NaN, integer keys or bytes are refused as over HTTP)."""
        parse = PARSERS.get(line.url) if isinstance(line.url, str) else None
        if parse is None:
            raise ApiError(
                404,
                f"url must be one of {', '.join(URLS)}, got {line.url!r}",
                "invalid_request_error",
                "url",
                "unknown_url",
            )
        if not isinstance(line.body, dict):
            raise invalid(f"body must be a JSON object, got {type(line.body).__name__}", "body", "invalid_json")
        if parse is parse_chat:
            parsed = parse_chat(line.body, self.model, self.tokenizer, self.config.max_n, images)
        else:
            parsed = parse(line.body, self.model, self.tokenizer, self.config.max_n)
        if parsed.stream:
            raise invalid("stream is not supported in batch jobs: results are whole responses", "stream")
        return parsed

    async def _report(self, job_id: str, custom_id: str, response: dict | None, error: dict | None) -> bool:
        await self._publish(JobResult(job_id, custom_id, response, error), f"{job_id}:{custom_id}")
        return error is None

    async def _publish(self, msg: JobResult | JobDone, msg_id: str) -> None:
        """Publish a result, riding out a NATS outage (the msg id drops a retry whose first try landed)."""
        await retry(
            lambda: bus.publish(self.js, subjects.job_results(msg.job_id), msg, msg_id=msg_id),
            "job_result_publish",
            give_up_after=PUBLISH_FOR_S,
        )

    async def _published(self, job_id: str) -> tuple[dict[str, bool], bool]:
        """What an earlier run published: {custom_id: succeeded}, and whether the JobDone is there."""
        subject = subjects.job_results(job_id)
        info = await self.js.stream_info(subjects.JOB_RESULTS_STREAM, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        outcomes: dict[str, bool] = {}
        if not count:
            return outcomes, False
        async with aclosing(iter_results(self.js, job_id, limit=count)) as items:  # unsubscribed when we return
            async for item in items:
                if isinstance(item, JobDone):
                    return outcomes, True
                outcomes.setdefault(item.custom_id, item.error is None)
        return outcomes, False


def _refused(e: Exception) -> bool:
    return isinstance(e, ApiError) and e.status in (429, 503)

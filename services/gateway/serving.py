"""One generation request end to end: body -> ParsedRequest -> router -> chunks -> JSON or SSE.

The chunks come from a generation.Generation, which hides failover: a request whose worker dies goes on
elsewhere and this module sees one stream of chunks.
"""

import asyncio
import time
import uuid

import structlog
from aiohttp import web

from services.gateway import responses as R
from services.gateway.body import parse_json, read_body
from services.gateway.chat import parse_chat
from services.gateway.completion import parse_completion
from services.gateway.generation import Generation
from services.gateway.multimodal import load_images
from services.gateway.protocol import ParsedRequest
from services.gateway.state import Gateway
from shared.errors import ApiError
from shared.messages import GenerateRequest, SeqOutput, StreamChunk

log = structlog.get_logger("xllm.gateway")

PARSE_INLINE_BYTES = 32 * 1024  # larger bodies are parsed and tokenized in a thread, off the event loop


async def generate(request: web.Request, gw: Gateway, kind: str) -> web.StreamResponse:
    """Handle POST /v1/chat/completions (kind "chat") or /v1/completions (kind "completion")."""
    arrival = time.monotonic()
    raw = await read_body(request, gw.config.max_body_bytes)
    parsed = await _parse(raw, gw, kind)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    with structlog.contextvars.bound_contextvars(request_id=rid):
        req = GenerateRequest(
            rid, parsed.prompt_token_ids, parsed.params.to_dict(), reply_subject="", images=parsed.images
        )
        gw.metrics.prompt_tokens.inc(len(req.prompt_token_ids))
        log.info(
            "request_accepted",
            kind=kind,
            prompt_tokens=len(req.prompt_token_ids),
            n=parsed.params.n,
            max_tokens=parsed.params.max_tokens,
            stream=parsed.stream,
        )
        run = _Run(request, gw, parsed, rid, arrival)
        # Non-streaming, nothing reached the client yet: after a failure with n > 1 it may start over.
        restart = None if parsed.stream else run.restart
        cfg = gw.config
        async with Generation.open(
            gw.backend, req, cfg.first_token_timeout_s, cfg.inter_token_timeout_s, restart
        ) as gen:
            first = await gen.next()
            if first.error:  # nothing sent yet: a real HTTP status (429/503 from the router, 400...)
                raise ApiError.from_wire(first.error, cfg.retry_after_s)
            if parsed.stream:
                return await run.stream_sse(gen, first)
            return await run.respond_json(gen, first)


async def _parse(raw: bytes, gw: Gateway, kind: str) -> ParsedRequest:
    loop = asyncio.get_running_loop()
    body = parse_json(raw) if len(raw) <= PARSE_INLINE_BYTES else await loop.run_in_executor(None, parse_json, raw)
    if kind == "completion":
        return parse_completion(body, gw.model, gw.tokenizer, gw.config.max_n)
    images = await load_images(body, gw.model.name, gw.model.vision, gw.config.image_limits(), gw.http)

    def work() -> ParsedRequest:
        return parse_chat(body, gw.model, gw.tokenizer, gw.config.max_n, images)

    if len(raw) <= PARSE_INLINE_BYTES:
        return work()
    return await loop.run_in_executor(None, work)


class _Run:
    """The state of one request while its chunks arrive."""

    def __init__(self, request: web.Request, gw: Gateway, parsed: ParsedRequest, rid: str, arrival: float):
        self.request, self.gw, self.parsed, self.rid, self.arrival = request, gw, parsed, rid, arrival
        self.created = int(time.time())
        self.col = R.Collector(parsed.params.n, len(parsed.prompt_token_ids), keep=not parsed.stream)
        self.first_output: float | None = None
        self.last_output: float | None = None

    def restart(self) -> None:
        """Drop what was collected: the request starts over on another instance."""
        self.col = R.Collector(self.parsed.params.n, len(self.parsed.prompt_token_ids), keep=True)

    async def respond_json(self, gen: Generation, chunk: StreamChunk) -> web.Response:
        while True:
            if chunk.error:
                raise ApiError.from_wire(chunk.error, self.gw.config.retry_after_s)
            self._observe(self.col.add(chunk))
            if chunk.finished:
                break
            if self.request.transport is None or self.request.transport.is_closing():
                log.info("client_disconnected")
                return web.Response(status=499)  # leaving the stream aborts the request
            chunk = await gen.next()
        self._done()
        body = R.response_body(
            self.parsed.kind, self.rid, self.created, self.gw.model.name, self.col, self.gw.tokenizer, self.parsed.echo
        )
        return web.Response(body=R.dumps(body), content_type="application/json", headers={"X-Request-Id": self.rid})

    async def stream_sse(self, gen: Generation, chunk: StreamChunk) -> web.StreamResponse:
        """OpenAI SSE: role chunk(s) first (chat), deltas, finish_reason, usage chunk if asked, [DONE].
        Errors after the headers went out become an error event before [DONE]."""
        headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Request-Id": self.rid,
        }
        resp = web.StreamResponse(headers=headers)
        try:
            await resp.prepare(self.request)
            if self.parsed.kind == "chat":
                role = {"role": "assistant", "content": ""}
                await resp.write(b"".join(R.sse(self._chat_chunk(i, role)) for i in range(self.parsed.params.n)))
            await self._stream_chunks(resp, gen, chunk)
            await resp.write(R.SSE_DONE)
        except ConnectionResetError:  # the client went away: leaving the stream aborts the request
            log.info("client_disconnected")
            self.request["client_gone"] = True
        return resp

    async def _stream_chunks(self, resp: web.StreamResponse, gen: Generation, chunk: StreamChunk) -> None:
        """The events of every chunk up to the last one, or up to an error (sent as an error event)."""
        while True:
            if chunk.error:
                await resp.write(R.sse(ApiError.from_wire(chunk.error, 0).body()))
                return
            outputs = self.col.add(chunk)
            self._observe(outputs)
            events = [e for e in map(self._event, outputs) if e is not None]
            if chunk.finished:
                self._done()
                if self.parsed.include_usage:
                    events.append(R.usage_chunk(self.parsed.kind, self.rid, self.created, self.gw.model.name, self.col))
            if events:
                await resp.write(b"".join(map(R.sse, events)))
            if chunk.finished:
                return
            try:
                chunk = await gen.next()
            except ApiError as e:
                log.warning("stream_ended_early", error=e.message)
                await resp.write(R.sse(e.body()))
                return

    def _event(self, out: SeqOutput) -> dict | None:
        """The SSE chunk for one sequence's new output (None when there is nothing to say)."""
        if not (out.text or out.finish_reason or out.logprobs):
            return None
        tok = self.gw.tokenizer
        if self.parsed.kind == "chat":
            delta = {"content": out.text} if out.text else {}
            lp = R.chat_logprobs(tok, out.token_ids, out.logprobs) if out.logprobs else None
            return self._chat_chunk(out.index, delta, out.finish_reason, lp)
        choice = self.col.choices[out.index]
        text = out.text
        if self.parsed.echo is not None and not choice.started:
            text = self.parsed.echo + text
        choice.started = True
        lp = None
        if out.logprobs:
            lp = R.completion_logprobs(tok, out.token_ids, out.logprobs, choice.text_offset)
            choice.text_offset += sum(len(t) for t in lp["tokens"])
        return R.completion_chunk(
            self.rid,
            self.created,
            self.gw.model.name,
            out.index,
            text,
            out.finish_reason,
            lp,
            self.parsed.include_usage,
        )

    def _chat_chunk(self, index: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> dict:
        return R.chat_chunk(
            self.rid, self.created, self.gw.model.name, index, delta, finish, lp, self.parsed.include_usage
        )

    def _observe(self, outputs: list[SeqOutput]) -> None:
        new_tokens = sum(len(o.token_ids) for o in outputs)
        if not new_tokens:
            return
        now = time.monotonic()
        m = self.gw.metrics
        if self.last_output is None:
            self.first_output = now
            m.ttft.observe(now - self.arrival)
        else:
            m.inter_token.observe(now - self.last_output)
        self.last_output = now
        m.generation_tokens.inc(new_tokens)

    def _done(self) -> None:
        m = self.gw.metrics
        m.e2e.observe(time.monotonic() - self.arrival)
        if self.first_output is not None:
            per_choice = self.col.completion_tokens / self.parsed.params.n
            tpot = (self.last_output - self.first_output) / max(1.0, per_choice - 1)
            m.record_slo(self.first_output - self.arrival, tpot, self.gw.config.slo_ttft_ms, self.gw.config.slo_tpot_ms)
        m.cached_tokens.inc(self.col.cached_tokens)
        log.info("request_finished", completion_tokens=self.col.completion_tokens, cached_tokens=self.col.cached_tokens)

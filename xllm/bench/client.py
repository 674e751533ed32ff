"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

TTFT is the time to the first chunk that carries text; ITL are the gaps between successive text
chunks; TPOT is (e2e - ttft) / (output_tokens - 1). Output tokens come from the server's usage
(we ask for it with stream_options.include_usage) and are checked against the number of text chunks:
a server that streams one token per chunk gives equal counts, `usage_mismatch` flags the others.
"""

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from xllm.bench.workloads import BenchRequest


@dataclass
class Target:
    """Where and how to send: the server, the model, and the request options shared by all requests."""

    base_url: str  # http://host:port (a trailing /v1 is accepted)
    model: str
    endpoint: str = "chat"  # "chat" | "completions"
    api_key: str | None = None
    timeout_s: float = 300.0
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{api_root(self.base_url)}/{path}"

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None  # kind: "http_<status>" | "timeout" | "connection" | "stream_error" | ...
    detail: str = ""
    start: float = 0.0  # perf_counter at send
    ttft: float | None = None  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # text chunks received
    output_tokens: int = 0  # from usage when reported, else the chunk count
    prompt_tokens: int = 0  # from usage when reported, else the intended input length
    usage_reported: bool = False
    input_len: int = 0  # intended (approximate) input length

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def usage_mismatch(self) -> bool:
        return self.ok and self.usage_reported and self.output_tokens != self.chunks


def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def build_payload(req: BenchRequest, target: Target, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, "max_tokens": req.max_tokens}
    if target.endpoint == "chat":
        messages = [{"role": "system", "content": req.system}] if req.system else []
        content: str | list = req.prompt
        if req.images:
            images = [{"type": "image_url", "image_url": {"url": url}} for url in req.images]
            content = [*images, {"type": "text", "text": req.prompt}]
        body["messages"] = [*messages, {"role": "user", "content": content}]
    else:
        body["prompt"] = f"{req.system}\n\n{req.prompt}" if req.system else req.prompt
    body["temperature"] = target.temperature
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:  # vLLM-style; llama.cpp's server and ours read ignore_eos too
        body["ignore_eos"] = True
        body["min_tokens"] = req.max_tokens
    body.update(target.extra_body)
    return body


def chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        d = c["delta"] or {}
        return (d.get("content") or "") + (d.get("reasoning_content") or "")
    return c.get("text") or ""


async def send(session: aiohttp.ClientSession, target: Target, req: BenchRequest) -> RequestResult:
    """Send one streamed request; never raises for server or network trouble, returns the error kind."""
    res = RequestResult(ok=False, input_len=req.input_len, prompt_tokens=req.input_len)
    res.start = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        payload = build_payload(req, target)
        async with session.post(target.url, json=payload, headers=target.headers(), timeout=timeout) as r:
            if r.status != 200:
                res.error, res.detail = f"http_{r.status}", (await r.text())[:300]
                return res
            if not await _read_stream(r, res):
                return res
        res.e2e = time.perf_counter() - res.start
    except TimeoutError as e:  # before ClientError: aiohttp's ServerTimeoutError is both
        res.error, res.detail = "timeout", str(e)[:300]
        return res
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as e:
        res.error, res.detail = "connection", f"{type(e).__name__}: {e}"[:300]
        return res
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, aiohttp.ClientError) as e:
        res.error, res.detail = "bad_response", f"{type(e).__name__}: {e}"[:300]
        return res
    if not res.usage_reported:
        res.output_tokens = res.chunks
    if res.chunks == 0:
        res.error, res.detail = "empty_output", "the stream ended without any text"
        return res
    res.ok = True
    return res


async def _read_stream(r: aiohttp.ClientResponse, res: RequestResult) -> bool:
    """Time an SSE stream's text chunks into `res`; False when it carried an error event."""
    last = res.start
    async for raw in r.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("error"):
            res.error, res.detail = "stream_error", json.dumps(event["error"])[:300]
            return False
        now = time.perf_counter()
        if chunk_text(event):
            if res.ttft is None:
                res.ttft = now - res.start
            else:
                res.itl.append(now - last)
            last = now
            res.chunks += 1
        if usage := event.get("usage"):
            res.usage_reported = True
            res.output_tokens = int(usage.get("completion_tokens") or 0)
            res.prompt_tokens = int(usage.get("prompt_tokens") or res.prompt_tokens)
    return True

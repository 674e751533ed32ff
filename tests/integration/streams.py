"""A streaming client for the integration tests: what one completions stream delivered."""

import json
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Stream:
    status: int = 0
    tokens: int = 0  # usage.completion_tokens of the final chunk
    text: str = ""
    errors: list = field(default_factory=list)  # error events inside the stream
    finish_reason: str | None = None
    body: str = ""  # the error body when the status is not 200


async def completion_stream(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, started=None
) -> Stream:
    """POST a streamed /v1/completions request that must run to `max_tokens` (greedy, ignore_eos).
    `started` (an asyncio.Event) is set once text arrived."""
    body = {
        "model": "smollm2",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = Stream()
    async with session.post(f"{url}/v1/completions", json=body) as r:
        out.status = r.status
        if r.status != 200:
            out.body = await r.text()
            return out
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out.errors.append(event["error"])
            if event.get("usage"):
                out.tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                out.text += choice["text"]
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if out.text and started is not None:
                started.set()
    return out

"""OpenAI response bodies: full responses, SSE chunks, usage, logprobs — built from StreamChunks."""

import json
import math
from dataclasses import dataclass, field
from typing import Any

from shared.messages import SeqOutput, StreamChunk

SSE_DONE = b"data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way


@dataclass
class Choice:
    """One of the n sequences, accumulated over chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    text_offset: int = 0  # completions logprobs: offset of the next token in the choice's text
    started: bool = False  # has any output been sent (for echo and chat role chunks)


class Collector:
    """Gathers a request's chunks: choices (texts when `keep`), generated token count, cached tokens."""

    def __init__(self, n: int, prompt_tokens: int, keep: bool = True):
        self.choices = [Choice() for _ in range(n)]
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.keep = keep

    def add(self, chunk: StreamChunk) -> list[SeqOutput]:
        """The chunk's outputs (indices out of range dropped); updates counts and, if kept, texts."""
        self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)
        outputs = []
        for d in chunk.outputs:
            out = SeqOutput(**d)
            if not 0 <= out.index < len(self.choices):
                continue
            choice = self.choices[out.index]
            self.completion_tokens += len(out.token_ids)
            if out.finish_reason:
                choice.finish_reason = out.finish_reason
            if self.keep:
                choice.text += out.text
                choice.token_ids.extend(out.token_ids)
                choice.logprobs.extend(out.logprobs or [])
            outputs.append(out)
        return outputs

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_body(
    kind: str, rid: str, created: int, model: str, col: Collector, tokenizer: Any, echo: str | None = None
) -> dict[str, Any]:
    """The non-streaming OpenAI response of a finished request (the REST API's and the job runner's)."""
    if kind == "chat":
        return chat_response(rid, created, model, col, tokenizer)
    return completion_response(rid, created, model, col, tokenizer, echo)


def chat_response(rid: str, created: int, model: str, col: Collector, tokenizer: Any) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs) if c.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for i, c in enumerate(col.choices)
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": col.usage(),
        "system_fingerprint": None,
    }


def completion_response(
    rid: str, created: int, model: str, col: Collector, tokenizer: Any, echo: str | None = None
) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(col.choices):
        lp = completion_logprobs(tokenizer, c.token_ids, c.logprobs, 0) if c.logprobs else None
        text = (echo or "") + c.text
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": col.usage(),
        "system_fingerprint": None,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if with_usage:
        out["usage"] = None  # as OpenAI: every chunk but the last has usage null
    return out


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(kind: str, rid: str, created: int, model: str, col: Collector) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage: no choices, the request's usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": col.usage()}


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[Any]) -> dict[str, Any]:
    """OpenAI chat logprobs from per-token `[logprob, [[token_id, logprob], ...]]`."""
    content = []
    for tid, (lp, top) in zip(token_ids, logprobs):
        entry = _token_entry(tokenizer, tid, lp)
        entry["top_logprobs"] = [_token_entry(tokenizer, t, tlp) for t, tlp in top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[Any], offset: int) -> dict:
    """OpenAI (legacy) completions logprobs; `offset` is where these tokens start in the choice's text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for tid, (lp, top) in zip(token_ids, logprobs):
        piece = token_text(tokenizer, tid)
        tokens.append(piece)
        token_logprobs.append(_clamp(lp))
        top_logprobs.append({token_text(tokenizer, t): _clamp(tlp) for t, tlp in top})
        text_offset.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token's text, special tokens included (a logprob for "<|im_end|>" should say so)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    piece = token_text(tokenizer, token_id)
    return {"token": piece, "logprob": _clamp(logprob), "bytes": list(piece.encode("utf-8"))}


def _clamp(logprob: float) -> float:
    return _MIN_LOGPROB if math.isnan(logprob) or logprob < _MIN_LOGPROB else float(logprob)


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + dumps(obj) + b"\n\n"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

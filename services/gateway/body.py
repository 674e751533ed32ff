"""An HTTP request body -> a JSON object: size limit first, then UTF-8, then JSON; a 4xx otherwise."""

import json
from typing import Any

from aiohttp import web

from shared.errors import ApiError, invalid


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: refused from Content-Length before reading, and while reading
    (a chunked upload has no length to trust)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(request.content_length, limit)
    body = bytearray()
    while chunk := await request.content.readany():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large(None, limit)
    return bytes(body)


def too_large(size: int | None, limit: int) -> ApiError:
    got = f" ({size} bytes)" if size is not None else ""
    return ApiError(
        413,
        f"request body is too large{got}; the limit is {limit} bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: UTF-8, finite numbers, no lone surrogates; 400 otherwise."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        msg = f"request body is not valid UTF-8 (bad byte at offset {e.start})"
        raise invalid(msg, None, "invalid_utf8") from None
    if not text.strip():
        raise invalid("request body is empty; expected a JSON object", None, "invalid_json")
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise invalid("request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:
        raise invalid(f"request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object", None, "invalid_json")
    _check_unicode(body)
    return body


def _check_unicode(body: Any) -> None:
    """Refuse lone surrogates (valid JSON escapes, but not encodable text for tokenizer or msgpack)."""
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                msg = "request body contains invalid Unicode (a lone surrogate escape)"
                raise invalid(msg, None, "invalid_utf8") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value

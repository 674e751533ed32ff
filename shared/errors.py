"""The one error type of the system: a failed request as OpenAI's API reports it, with its HTTP status.

Raised and caught inside a service; on the bus (`StreamChunk.error`, `Ack.error`, `RouteReply.error`)
it travels as `to_wire()`, and the gateway answers it as OpenAI error JSON with `status` as the HTTP
status. A retriable error (429, 503) means another instance, or a later try, may succeed.

    raise invalid("temperature must be in [0, 2], got 9", "temperature")
    chunk = StreamChunk(rid, finished=True, error=unavailable("the engine is stopping").to_wire())
    err = ApiError.from_wire(chunk.error)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RETRIABLE = (429, 503)


@dataclass
class ApiError(Exception):
    status: int  # the HTTP status
    message: str
    type: str = "invalid_request_error"  # OpenAI's error type
    param: str | None = None  # the request field at fault
    code: str | None = None  # OpenAI's error code: "context_length_exceeded", "worker_unavailable"...
    retry_after: int | None = None  # seconds, sent as Retry-After by the gateway (429 / 503)

    def __str__(self) -> str:
        return self.message

    @property
    def retriable(self) -> bool:
        return self.status in RETRIABLE

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            "retry_after": self.retry_after,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any], retry_after: int | None = None) -> ApiError:
        """The error another service sent; a malformed one becomes a 502 that says so."""
        status = wire.get("status")
        if not (isinstance(status, int) and 400 <= status <= 599 and isinstance(wire.get("message"), str)):
            return ApiError(502, f"malformed error from the serving backend: {wire!r:.200}", "server_error")
        kind = wire.get("type") if isinstance(wire.get("type"), str) else None
        fields = {
            k: v if isinstance(v, str) else None for k, v in (("param", wire.get("param")), ("code", wire.get("code")))
        }
        return ApiError(
            status,
            wire["message"],
            kind or _default_type(status),
            **fields,
            retry_after=_seconds(wire.get("retry_after"), retry_after) if status in RETRIABLE else None,
        )


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """400: the request itself is wrong; no instance would take it."""
    return ApiError(400, message, "invalid_request_error", param, code)


def overloaded(message: str, code: str | None = "overloaded") -> ApiError:
    """429: full; another instance, or a later try, may take it."""
    return ApiError(429, message, "overloaded", None, code)


DECODE_UNREACHABLE = "decode_unreachable"  # a prefill worker could not hand a prompt's KV to its decode worker


def unavailable(message: str, code: str | None = None) -> ApiError:
    """503: this instance (or every one tried) cannot serve it now; another may."""
    return ApiError(503, message, "server_error", None, code)


def internal(message: str) -> ApiError:
    """500: a bug or a failed engine: retrying elsewhere would not help."""
    return ApiError(500, message, "server_error")


def aborted() -> ApiError:
    """499 (nginx's "client closed request"): the client went away, so the request was dropped."""
    return ApiError(499, "the request was aborted", "server_error", None, "aborted")


def _seconds(sent: Any, default: int | None) -> int | None:
    """The Retry-After the sender set (a whole number of seconds), else `default`."""
    return sent if isinstance(sent, int) and not isinstance(sent, bool) and sent >= 0 else default


def _default_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"

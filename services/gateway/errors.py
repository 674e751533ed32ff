"""The one error type of the gateway: becomes OpenAI error JSON `{"error": {message, type, param, code}}`."""

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After (429 / 503)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400: the request itself is wrong."""
    return ApiError(400, message, "invalid_request_error", param, code)


def from_chunk_error(error: dict, retry_after: int) -> ApiError:
    """A StreamChunk's `error` ({message, type, code: HTTP status}) from the router or a worker."""
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    kind = error.get("type") or ("invalid_request_error" if status < 500 else "server_error")
    message = str(error.get("message") or "the request failed in the serving backend")
    param = error.get("param") if isinstance(error.get("param"), str) else None
    return ApiError(status, message, str(kind), param, None, retry_after if status in (429, 503) else None)

"""Typed errors of the engine API. The gateway maps them to OpenAI error JSON (HTTP 400)."""


class EngineError(Exception):
    """Base class for errors the engine raises on bad input; the engine keeps serving others."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot run as given (bad parameter, prompt too long...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

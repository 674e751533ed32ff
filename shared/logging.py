"""structlog setup shared by every service: one line per event, each carrying service, pid, request_id.

JSON lines when stderr is not a terminal (what log shippers read), colourful key=value on a terminal.
Standard-library loggers (nats-py, aiohttp, asyncio) go through the same renderer, so their lines
carry the service name and the current request id too.

    configure_logging("router")
    log = get_logger(__name__)
    with bind_request(req.request_id):
        log.info("routed", instance=iid)     # -> {"event": "routed", "request_id": ..., ...}

The request id lives in a contextvar: asyncio tasks created inside the `with` inherit it, and
concurrent requests on one event loop do not see each other's.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

LOG_LEVELS = ("debug", "info", "warning", "error")  # what every service's --log-level accepts
LEVELS = (*LOG_LEVELS, "critical")


def configure_logging(service: str, level: str = "info", *, json: bool | None = None) -> None:
    """Route structlog and stdlib logging to stderr. `json=None` picks JSON unless stderr is a tty."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if json is None:
        json = not sys.stderr.isatty()

    def add_service(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        event.setdefault("pid", os.getpid())  # looked up per line: correct after a fork too
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # configure_logging may be called again (tests, CLI)
    )
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json:
        final.append(structlog.processors.format_exc_info)  # tracebacks as one JSON string
    final.append(renderer)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def get_logger(name: str | None = None, **bound: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name, **bound)


@contextmanager
def bind_request(request_id: str, **extra: Any) -> Iterator[None]:
    """Every log line inside the block (and in tasks it creates) carries `request_id` (and `extra`)."""
    with structlog.contextvars.bound_contextvars(request_id=request_id, **extra):
        yield

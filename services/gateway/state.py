"""The gateway's per-app state, shared by the HTTP handlers (app.py) and the request path (serving.py)."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.protocol import ModelInfo
from services.gateway.telemetry import GatewayMetrics
from shared.errors import ApiError


@dataclass
class Gateway:
    config: GatewayConfig
    tokenizer: Any  # shared.tokenizer.Tokenizer or anything with its methods
    model: ModelInfo
    backend: Backend
    view: Any | None  # the process's InstanceView, or anything with `instances() -> list[InstanceInfo]`
    metrics: GatewayMetrics
    http: aiohttp.ClientSession | None = None  # fetches image URLs; None: they are refused
    inflight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of the `max_inflight` request slots; 429 with Retry-After when all are taken."""
        if self.inflight >= self.config.max_inflight:
            raise ApiError(
                429,
                f"the server is busy ({self.inflight} requests in flight); retry later",
                "overloaded",
                None,
                "too_many_requests",
                self.config.retry_after_s,
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def instances(self) -> list:
        return self.view.instances() if self.view is not None else []


GATEWAY = web.AppKey("gateway", Gateway)

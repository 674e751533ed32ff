"""The lifecycle every service shares, written once: connect to NATS, start, serve /metrics, wait for
SIGTERM or SIGINT, stop (the service finishes or hands back what it holds), close the connection.

    class RouterService:                       # any class of this shape (`Service`)
        name = "router"
        def __init__(self, config: RouterConfig): ...
        async def start(self, nc: Client) -> None: ...   # subscribe, begin work
        async def stop(self) -> None: ...                # take no more work, drain what is in flight

    # services/router/__main__.py
    sys.exit(main(RouterService, RouterConfig, "python -m services.router"))
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import uvloop
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from shared import bus
from shared.config import load_config
from shared.logging import configure_logging, get_logger
from shared.metrics import serve_metrics

log = get_logger("xllm.service")


class Service(Protocol):
    name: ClassVar[str]  # what its log lines say ("router", "prefill"...)
    config: Any  # has `nats`, `log_level` and may have `metrics_port`
    metrics: CollectorRegistry | None  # served at /metrics when the config has a metrics port

    async def start(self, nc: Client) -> None: ...

    async def stop(self) -> None: ...


async def serve(service: Service, stop: asyncio.Event | None = None, started: asyncio.Event | None = None) -> None:
    """Run `service` until `stop` is set (default: until SIGTERM / SIGINT); `started` is set once serving.
    Its NATS connection is named after its instance id when it has one (workers), else its name."""
    nc = await bus.connect(service.config.nats, getattr(service, "instance_id", service.name))
    stop = stop or stop_on_signals()
    metrics = None
    try:
        await service.start(nc)
        port = getattr(service.config, "metrics_port", None)
        if port is not None and service.metrics is not None:
            metrics = await serve_metrics(service.metrics, port)
        log.info("serving", service=service.name, nats=service.config.nats)
        if started is not None:
            started.set()
        await stop.wait()
    finally:
        log.info("stopping", service=service.name)
        try:
            await service.stop()
        finally:
            if metrics is not None:
                await metrics.cleanup()
            if not nc.is_closed:
                await nc.drain()


def main(make: Callable[[Any], Service], config_cls: type, prog: str, argv: Sequence[str] | None = None) -> int:
    """The entry point of `python -m services.<name>`: flags and XLLM_* env into the config, logging, serve.
    Exit 1 (one line, no traceback) when NATS is unreachable."""
    config = load_config(config_cls, sys.argv[1:] if argv is None else argv, prog=prog)
    service = make(config)
    configure_logging(service.name, config.log_level)
    try:
        uvloop.run(serve(service))
    except bus.BusError as e:
        print(f"{service.name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130
    return 0


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call from within the running event loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop

"""Start the gateway: NATS, tokenizer, instance registry, HTTP server; stop cleanly on SIGTERM/SIGINT."""

import asyncio
from typing import Any

import structlog
import uvloop
from aiohttp import web

from services.gateway.app import create_app
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.jobs import JobRunner
from services.gateway.protocol import ModelInfo
from shared.bus import connect
from shared.instance_view import InstanceView
from shared.logging import configure_logging
from shared.signals import stop_on_signals

log = structlog.get_logger("xllm.gateway")


def run(config: GatewayConfig) -> None:
    """Serve until SIGTERM / SIGINT (the entry point of `python -m services.gateway`)."""
    configure_logging("gateway", config.log_level)
    uvloop.run(serve(config))


def model_info(
    config: GatewayConfig, model_config: Any, generation_defaults: dict | None = None
) -> ModelInfo:
    """What the gateway serves: the model as `--model` named it (as vLLM does) and its context,
    unless the config overrides them."""
    return ModelInfo(
        name=config.served_model_name or config.model,
        max_model_len=config.max_model_len or model_config.max_position_embeddings,
        vocab_size=model_config.vocab_size,
        generation_defaults=dict(generation_defaults or {}),
    )


async def serve(
    config: GatewayConfig, stop: asyncio.Event | None = None, started: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set (default: until SIGTERM / SIGINT); `started` is set once listening."""
    from shared.engine.loader import load_generation_defaults, load_tokenizer  # imports torch: only when serving

    loop = asyncio.get_running_loop()
    tokenizer, model_config = await loop.run_in_executor(None, load_tokenizer, config.model)
    defaults = await loop.run_in_executor(None, load_generation_defaults, config.model)
    nc = await connect(config.nats, name="gateway")
    view = await InstanceView.open(nc)
    backend = Backend(nc, config.retry_after_s, view=view, max_submissions=config.max_submissions,
                      route_timeout_s=config.route_timeout_s)
    await backend.start()
    info = model_info(config, model_config, defaults)
    app = create_app(config, tokenizer, info, backend, view)
    jobs = JobRunner(nc, backend, tokenizer, info, config) if config.job_concurrency else None
    if jobs is not None:
        await jobs.start()
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.shutdown_timeout_s)  # fmt: skip
    await runner.setup()
    stop = stop or stop_on_signals()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        log.info("gateway_listening", url=f"http://{config.host}:{config.port}", model=info.name)
        if started is not None:
            started.set()
        await stop.wait()
        log.info("gateway_stopping", inflight=backend.active)
    finally:
        if jobs is not None:
            await jobs.stop()  # a job in progress goes back to the stream, resumed by the next runner
        await runner.cleanup()  # stops accepting; in-flight requests get shutdown_timeout_s to finish
        await backend.close()
        await view.close()
        await nc.drain()
        log.info("gateway_stopped")

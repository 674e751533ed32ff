"""The gateway as a service: tokenizer, instance view, backend, job runner and HTTP server, started and
stopped by shared/service.py (`python -m services.gateway`)."""

import asyncio

import structlog
from aiohttp import web
from nats.aio.client import Client

from services.gateway.app import create_app
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.jobs import JobRunner
from services.gateway.multimodal import VisionInfo
from services.gateway.protocol import ModelInfo
from shared.engine.config import ModelConfig
from shared.images import ImageProcessorConfig
from shared.instance_view import InstanceView
from shared.model_files import load_generation_defaults, load_tokenizer, resolve_model

log = structlog.get_logger("xllm.gateway")


def model_info(config: GatewayConfig, model_config: ModelConfig, generation_defaults: dict | None = None) -> ModelInfo:
    """What the gateway serves: the model as `--model` named it (as vLLM does) and its context,
    unless the config overrides them; how it takes images, if it does."""
    vision = None
    if model_config.image_tokens:
        processor = ImageProcessorConfig.from_dir(resolve_model(config.model))
        vision = VisionInfo(model_config.image_token_id, model_config.image_tokens, processor)
    return ModelInfo(
        name=config.served_model_name or config.model,
        max_model_len=config.max_model_len or model_config.max_position_embeddings,
        vocab_size=model_config.vocab_size,
        generation_defaults=dict(generation_defaults or {}),
        vision=vision,
    )


class GatewayService:
    name = "gateway"
    metrics = None  # served on the HTTP port itself, at /metrics

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.view: InstanceView | None = None
        self.backend: Backend | None = None
        self.jobs: JobRunner | None = None
        self.runner: web.AppRunner | None = None

    async def start(self, nc: Client) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        tokenizer, model_config = await loop.run_in_executor(None, load_tokenizer, config.model)
        defaults = await loop.run_in_executor(None, load_generation_defaults, config.model)
        info = await loop.run_in_executor(None, model_info, config, model_config, defaults)
        self.view = await InstanceView.open(nc)
        self.backend = Backend(
            nc,
            config.retry_after_s,
            view=self.view,
            max_submissions=config.max_submissions,
            route_timeout_s=config.route_timeout_s,
        )
        await self.backend.start()
        if config.job_concurrency:
            self.jobs = JobRunner(nc, self.backend, tokenizer, info, config)
            await self.jobs.start()
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
        self.runner = web.AppRunner(
            create_app(config, tokenizer, info, self.backend, self.view),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=config.shutdown_timeout_s,
        )
        await self.runner.setup()
        await web.TCPSite(self.runner, config.host, config.port).start()
        log.info("gateway_listening", url=f"http://{config.host}:{config.port}", model=info.name)

    async def stop(self) -> None:
        log.info("gateway_stopping", inflight=self.backend.active if self.backend else 0)
        if self.jobs is not None:
            await self.jobs.stop()  # a job in progress goes back to the stream, resumed by the next runner
        if self.runner is not None:
            await self.runner.cleanup()  # stops accepting; in-flight requests get shutdown_timeout_s to finish
        if self.backend is not None:
            await self.backend.close()
        if self.view is not None:
            await self.view.close()

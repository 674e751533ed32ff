"""Gateway settings: `--kebab-case` flags, each also read from `XLLM_<NAME>` (see shared/config.py)."""

from dataclasses import dataclass

from services.gateway.images import ImageLimits
from shared.config import opt
from shared.logging import LOG_LEVELS


@dataclass
class GatewayConfig:
    """OpenAI-compatible HTTP gateway: validates, tokenizes and streams requests over NATS."""

    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "HTTP port", min=0, max=65535)
    nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    model: str = opt("smollm2", "model name or path; only its tokenizer and chat template are loaded here")
    served_model_name: str | None = opt(None, "model id clients send (default: --model as given)")
    max_model_len: int | None = opt(None, "context length in tokens (default: the model's)", min=1)
    api_key: str | None = opt(None, "if set, /v1/* and /admin/* require 'Authorization: Bearer <key>'")
    max_body_bytes: int = opt(
        16 * 1024 * 1024, "largest request body accepted (413 above); data: URL images count", min=1024
    )
    max_inflight: int = opt(256, "requests handled at once; more get 429 with Retry-After", min=1)
    max_n: int = opt(16, "largest n (choices per request) accepted", min=1)
    first_token_timeout_s: float = opt(120.0, "seconds to wait for a request's first output", min=0.01)
    inter_token_timeout_s: float = opt(30.0, "seconds to wait between two outputs of a request", min=0.01)
    retry_after_s: int = opt(1, "Retry-After seconds sent with 429 / 503", min=0)
    max_submissions: int = opt(3, "submissions of a request when its worker fails (failover), then 503", min=1, max=16)
    route_timeout_s: float = opt(10.0, "seconds the router has to place a request", min=0.01)
    job_concurrency: int = opt(16, "offline job requests in flight per gateway (0: run no job runner)", min=0)
    shutdown_timeout_s: float = opt(30.0, "on SIGTERM, seconds in-flight requests get to finish", min=0)
    max_image_bytes: int = opt(20 * 1024 * 1024, "largest image accepted, encoded (data: URL or download)", min=1)
    max_images: int = opt(8, "images per request", min=1)
    image_fetch_timeout_s: float = opt(10.0, "seconds to download an http(s) image URL", min=0.01)
    allow_image_urls: bool = opt(True, "fetch http(s) image URLs (else only data: URLs are taken)")
    slo_ttft_ms: float | None = opt(None, "time-to-first-token target: completed requests count as met or not", min=1)
    slo_tpot_ms: float | None = opt(None, "time-per-output-token target, counted the same way", min=0.1)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_images=self.max_images,
            fetch_timeout_s=self.image_fetch_timeout_s,
            allow_http=self.allow_image_urls,
        )

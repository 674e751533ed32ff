"""Encoder settings: `--kebab-case` flags, each also read from `XLLM_<NAME>` (see shared/config.py)."""

from dataclasses import dataclass

from shared.config import check_nats_url, opt
from shared.logging import LOG_LEVELS


@dataclass
class EncoderConfig:
    """A multimodal encoder: runs a LLaVA's vision tower and projector for the workers (EPD)."""

    nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    model: str = opt("smollm2", "the multimodal model (a LLaVA Hugging Face folder)")
    instance_id: str | None = opt(None, "id in the registry (default: encoder-<host>-<pid>)")
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1...)")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16")
    num_threads: int | None = opt(None, "torch threads (default: torch's; set it when services share cores)", min=1)
    max_batch_images: int = opt(16, "images encoded in one forward pass", min=1)
    cache_bytes: int = opt(512 << 20, "embeddings kept (in shared memory) for repeated images", min=1)
    data_host: str = opt("", "address workers reach this encoder's data plane at (default: hostname)")
    data_port: int = opt(0, "TCP port of the embedding data plane (0: any free port)", min=0, max=65535)
    heartbeat_s: float = opt(1.0, "seconds between registry heartbeats", min=0.1)
    metrics_port: int | None = opt(None, "serve Prometheus /metrics on this port (0: any)", min=0, max=65535)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)

    def validate(self) -> None:
        check_nats_url(self.nats)

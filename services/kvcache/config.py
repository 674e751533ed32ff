"""kvcache settings: `--kebab-case` flags, each also read from `XLLM_<NAME>` (see shared/config.py)."""

from dataclasses import dataclass

from shared.config import check_nats_url, opt
from shared.logging import LOG_LEVELS


@dataclass
class KvCacheConfig:
    """Global KV block index: follows workers' KV events, answers longest-cached-prefix queries."""

    nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    metrics_port: int | None = opt(None, "serve Prometheus /metrics on this port (0: any)", min=0, max=65535)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)
    replay_timeout_s: float = opt(
        120.0,
        "at start, serve after this many seconds even if the replay has not caught up (answers may under-report)",
        min=0,
    )

    def validate(self) -> None:
        check_nats_url(self.nats)

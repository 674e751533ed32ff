"""Router settings: `--kebab-case` flags, each also read from `XLLM_<NAME>` (see shared/config.py)."""

from dataclasses import dataclass

from services.router.epd import ENCODE_MODES
from services.router.policy import MODES
from shared.config import check_nats_url, opt
from shared.logging import LOG_LEVELS

POLICIES = ("least-loaded", "prefix-aware")


@dataclass
class RouterConfig:
    """Request router: picks worker instances from the registry and forwards requests, with failover."""

    nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    mode: str = opt(
        "auto",
        "serving path; auto = per request, prefill->decode or whole on one instance, from predicted costs",
        choices=MODES,
        env="XLLM_ROUTER_MODE",
    )
    policy: str = opt("least-loaded", "instance ranking", choices=POLICIES, env="XLLM_ROUTER_POLICY")
    max_attempts: int = opt(3, "instances tried per request before it fails", min=1, max=16)
    ack_timeout_s: float = opt(2.0, "seconds a worker has to accept (ack) a forwarded request", min=0.01)
    recent_window_s: float = opt(1.0, "requests forwarded this recently count as load (~ heartbeat interval)", min=0.0)
    suspect_s: float = opt(3.0, "an instance that did not answer is tried last for this long", min=0.0)
    max_waiting_per_instance: int = opt(
        64, "an instance with this many waiting requests gets no more; all of them so: 429", min=1
    )
    max_waiting_offline: int = opt(
        32, "the same cap for offline (priority > 0) requests, stricter so online traffic keeps headroom", min=1
    )
    max_inflight: int = opt(
        1024, "requests being routed at once; more get 429 at once", min=1, env="XLLM_ROUTER_MAX_INFLIGHT"
    )
    slo_ttft_ms: float | None = opt(
        None, "time-to-first-token target: paths are chosen to meet it, and online requests that cannot get 429", min=1
    )
    slo_tpot_ms: float | None = opt(None, "time-per-output-token target the chosen path must keep", min=0.1)
    slo_reject_factor: float = opt(
        1.0, "refuse an online request (429) only when its predicted TTFT passes the target x this", min=1.0
    )
    encode: str = opt(
        "auto",
        "images: on an encoder instance (always), on the prefill/colocated worker (never), "
        "or per request from measured encode times and load (auto)",
        choices=ENCODE_MODES,
    )
    encode_timeout_s: float = opt(30.0, "seconds an encoder has to return a request's embeddings", min=0.01)
    kv_query_timeout_s: float = opt(0.05, "prefix-aware: seconds to wait for the kvcache service", min=0.001)
    prefix_weight: float = opt(4.0, "prefix-aware: load units a fully cached prompt is worth", min=0.0)
    metrics_port: int | None = opt(None, "serve Prometheus /metrics on this port (0: any)", min=0, max=65535)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)

    def validate(self) -> None:
        if self.max_waiting_offline > self.max_waiting_per_instance:
            raise ValueError(
                f"--max-waiting-offline ({self.max_waiting_offline}) must not exceed "
                f"--max-waiting-per-instance ({self.max_waiting_per_instance})"
            )
        check_nats_url(self.nats)

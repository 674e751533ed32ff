"""The gateway's Prometheus metrics (served at GET /metrics): its own requests and latencies, and each
live worker's load and KV figures as its last heartbeat reported them."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from shared.messages import InstanceInfo
from shared.metrics import LATENCY_BUCKETS


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter  # labels: route, status
    failovers: Counter  # labels: reason
    ttft: Histogram
    inter_token: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    cached_tokens: Counter
    running: Gauge
    slo: Counter  # labels: outcome

    def record_slo(self, ttft_s: float, tpot_s: float, ttft_ms: float | None, tpot_ms: float | None) -> None:
        """A completed request against the SLO targets (ms), when any is set: met, or which it missed."""
        if ttft_ms is None and tpot_ms is None:
            return
        missed = [
            name
            for name, value, target in (("ttft", ttft_s, ttft_ms), ("tpot", tpot_s, tpot_ms))
            if target is not None and value * 1000 > target
        ]
        self.slo.labels("missed_" + "_".join(missed) if missed else "met").inc()

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "GatewayMetrics":
        r = registry or CollectorRegistry()

        def histogram(name: str, help_text: str) -> Histogram:
            return Histogram(name, help_text, registry=r, buckets=LATENCY_BUCKETS)

        return cls(
            registry=r,
            requests=Counter(
                "xllm_gateway_requests_total", "HTTP requests by route and status code", ["route", "status"], registry=r
            ),
            failovers=Counter(
                "xllm_gateway_failovers_total", "requests moved to another instance, by cause", ["reason"], registry=r
            ),
            ttft=histogram("xllm_gateway_time_to_first_token_seconds", "request arrival to first generated token"),
            inter_token=histogram("xllm_gateway_inter_token_latency_seconds", "time between two outputs of a request"),
            e2e=histogram("xllm_gateway_e2e_request_latency_seconds", "request arrival to last token, completed"),
            prompt_tokens=Counter("xllm_gateway_prompt_tokens_total", "prompt tokens of accepted requests", registry=r),
            generation_tokens=Counter("xllm_gateway_generation_tokens_total", "tokens generated", registry=r),
            cached_tokens=Counter(
                "xllm_gateway_cached_prompt_tokens_total",
                "prompt tokens served from a worker's prefix cache",
                registry=r,
            ),
            running=Gauge("xllm_gateway_running_requests", "generation requests in flight in the gateway", registry=r),
            slo=Counter(
                "xllm_gateway_slo_requests_total",
                "completed requests against --slo-ttft-ms / --slo-tpot-ms: met (goodput), or the targets missed",
                ["outcome"],
                registry=r,
            ),
        )


# name -> (help, value of an instance)
INSTANCE_GAUGES: dict[str, tuple[str, Callable[[InstanceInfo], float]]] = {
    "xllm_instance_running": ("sequences running", lambda i: i.running),
    "xllm_instance_waiting": ("sequences waiting", lambda i: i.waiting),
    "xllm_instance_kv_blocks_free": ("free KV blocks", lambda i: i.free_blocks),
    "xllm_instance_kv_blocks_used": ("KV blocks in use", lambda i: i.total_blocks - i.free_blocks),
    "xllm_instance_prefix_cache_hit_rate": (
        "prompt blocks found in the prefix cache / looked up",
        lambda i: i.counters.get("prefix_hits", 0) / max(1, i.counters.get("prefix_queries", 0)),
    ),
    "xllm_instance_kv_transfer_bytes_total": (
        "KV bytes handed off (prefill) or taken (decode)",
        lambda i: i.counters.get("kv_transfer_bytes", 0),
    ),
    "xllm_instance_kv_transfer_seconds_total": (
        "time spent copying KV hand-offs",
        lambda i: i.counters.get("kv_transfer_seconds", 0),
    ),
}


class InstanceCollector:
    """The workers' heartbeat figures, read from the live registry view at scrape time."""

    def __init__(self, instances: Callable[[], list[InstanceInfo]]):
        self.instances = instances

    def collect(self) -> Iterator[Metric]:
        live = self.instances()
        for name, (help_text, value) in INSTANCE_GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=["instance", "role"])
            for info in live:
                gauge.add_metric([info.instance_id, info.role], float(value(info)))
            yield gauge

"""The gateway's Prometheus metrics (served at GET /metrics)."""

from dataclasses import dataclass

from shared.metrics import Counter, Gauge, Histogram, Registry


@dataclass
class GatewayMetrics:
    registry: Registry
    requests: Counter  # labels: route, status
    ttft: Histogram
    inter_token: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    cached_tokens: Counter
    running: Gauge

    @classmethod
    def create(cls, registry: Registry | None = None) -> "GatewayMetrics":
        r = registry or Registry()
        return cls(
            registry=r,
            requests=r.counter("xllm_gateway_requests_total", "HTTP requests by route and status code",
                               labels=("route", "status")),
            ttft=r.histogram("xllm_gateway_time_to_first_token_seconds",
                             "request arrival to first generated token"),
            inter_token=r.histogram("xllm_gateway_inter_token_latency_seconds",
                                    "time between two outputs of a request"),
            e2e=r.histogram("xllm_gateway_e2e_request_latency_seconds",
                            "request arrival to last token, completed generations"),
            prompt_tokens=r.counter("xllm_gateway_prompt_tokens_total", "prompt tokens of accepted requests"),
            generation_tokens=r.counter("xllm_gateway_generation_tokens_total", "tokens generated"),
            cached_tokens=r.counter("xllm_gateway_cached_prompt_tokens_total",
                                    "prompt tokens served from a worker's prefix cache"),
            running=r.gauge("xllm_gateway_running_requests", "generation requests in flight in the gateway"),
        )  # fmt: skip

"""Prometheus metrics: every service fills its own `prometheus_client` registry; this module serves one at
`GET /metrics` (for services without an HTTP server of their own) and turns a service's `stats()` dict
into gauges read at scrape time.

    registry = CollectorRegistry()
    requests = Counter("xllm_worker_requests_total", "requests by outcome", ["outcome"], registry=registry)
    registry.register(StatsCollector("xllm_router", service.stats))
    runner = await serve_metrics(registry, port)
"""

from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# `*_created` series (a timestamp per counter) are not something our dashboards use.
disable_created_metrics()

# Latency buckets (seconds) covering sub-millisecond hand-offs to minute-long generations.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StatsCollector:
    """A service's `stats()` as gauges named `<prefix>_<key>`: numbers as they are, dicts of numbers with
    a `kind` label (their keys appear as they happen, so they are read at scrape time)."""

    def __init__(self, prefix: str, stats: Callable[[], dict[str, Any]]):
        self.prefix, self.stats = prefix, stats

    def collect(self) -> Iterator[Metric]:
        for key, value in self.stats().items():
            name, what = f"{self.prefix}_{key}", key.replace("_", " ")
            if isinstance(value, dict):
                gauge = GaugeMetricFamily(name, what, labels=["kind"])
                for kind, number in value.items():
                    gauge.add_metric([str(kind)], number)
            else:
                gauge = GaugeMetricFamily(name, what, value=value)
            yield gauge


class SpeculationCollector:
    """An engine's speculative decoding counters (the `spec_*` keys of its stats), labelled by method."""

    COUNTERS = (
        ("xllm_spec_draft_tokens", "spec_drafted_tokens", "draft tokens scored"),
        ("xllm_spec_accepted_tokens", "spec_accepted_tokens", "draft tokens accepted"),
        ("xllm_spec_verifications", "spec_verifications", "sequence-steps that scored draft tokens"),
    )

    def __init__(self, method: str, stats: Callable[[], dict[str, Any]]):
        self.method, self.stats = method, stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for name, key, what in self.COUNTERS:
            counter = CounterMetricFamily(name, what, labels=["method"])
            counter.add_metric([self.method], stats[key])
            yield counter
        mean = GaugeMetricFamily(
            "xllm_spec_mean_acceptance_length",
            "tokens emitted per verification step (1 + accepted drafts)",
            labels=["method"],
        )
        verified = stats["spec_verifications"]
        mean.add_metric([self.method], 1 + stats["spec_accepted_tokens"] / verified if verified else 0.0)
        yield mean


class ExpertBalanceCollector:
    """An expert-parallel engine's balance (the `eplb_*` keys of its stats): imbalance per MoE layer, and
    the rebalances done and the time they spent moving weights."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        gauge = GaugeMetricFamily(
            "xllm_eplb_imbalance", "max / mean routed tokens per rank over the window, per MoE layer", labels=["layer"]
        )
        for layer, value in stats["eplb_imbalance"].items():
            gauge.add_metric([str(layer)], value)
        yield gauge
        yield CounterMetricFamily(
            "xllm_eplb_rebalances", "MoE layers whose experts were moved", stats["eplb_rebalances"]
        )
        yield CounterMetricFamily(
            "xllm_eplb_move_seconds", "time spent moving expert weights between ranks", stats["eplb_move_seconds"]
        )
        yield CounterMetricFamily(
            "xllm_eplb_unpaid_moves", "layer moves after which the layer was not faster", stats["eplb_unpaid_moves"]
        )


def exposition(registry: CollectorRegistry) -> web.Response:
    """`registry` in Prometheus' text format, as an HTTP response (labelled 0.0.4, which every scraper
    reads; the body is the same)."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve `GET /metrics` from `registry` until `await runner.cleanup()`."""
    app = web.Application()
    app.router.add_get("/metrics", lambda _request: exposition(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

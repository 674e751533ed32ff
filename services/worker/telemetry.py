"""What a worker reports of its engine: Prometheus gauges at /metrics, and the counters its registry
heartbeat carries (which the router and the gateway's /metrics read)."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from shared.metrics import ExpertBalanceCollector, SpeculationCollector

ENGINE_GAUGES = {
    "running": "sequences running",
    "waiting": "sequences waiting",
    "free_blocks": "free KV blocks",
    "total_blocks": "KV blocks in all",
    "prefix_hits": "prompt blocks found in the prefix cache",
    "prefix_queries": "prompt blocks looked up in the prefix cache",
    "preemptions": "sequences preempted",
}


def watch_engine(registry: CollectorRegistry, stats: Callable[[], dict], speculative: str) -> None:
    """Gauges read from the engine's stats at scrape time, with its speculation and expert figures if any."""
    for key, help_text in ENGINE_GAUGES.items():
        Gauge(f"xllm_worker_{key}", help_text, registry=registry).set_function(lambda k=key: stats()[k])
    if speculative != "none":
        registry.register(SpeculationCollector(speculative, stats))
    if "eplb_imbalance" in stats():
        registry.register(ExpertBalanceCollector(stats))


def heartbeat_counters(stats: dict, registry: CollectorRegistry) -> dict[str, float]:
    """Cumulative figures for the registry entry: prefix cache, preemptions, busy time, KV hand-offs, and the
    speculation, image and expert-balancing counters the engine has."""
    sample = registry.get_sample_value
    return {
        "prefix_queries": stats["prefix_queries"],
        "prefix_hits": stats["prefix_hits"],
        "preemptions": stats["preemptions"],
        "busy_seconds": stats["busy_seconds"],
        "kv_transfer_bytes": sample("xllm_kv_transfer_bytes_total"),
        "kv_transfer_seconds": sample("xllm_kv_transfer_seconds_sum"),
        **{key: value for key, value in stats.items() if key.startswith(("spec_", "image"))},
        **{key: stats[key] for key in ("eplb_rebalances", "eplb_move_seconds") if key in stats},
    }

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
TIER_GAUGES = {  # the second KV tier's, when there is one (shared/engine/kv_tier.py)
    "kv_host_blocks": "KV blocks the second tier holds in all",
    "kv_host_used_blocks": "KV blocks held in the second tier",
    "kv_swapped_out_blocks": "KV blocks copied down to the second tier",
    "kv_swapped_in_blocks": "KV blocks brought back up from the second tier",
    "kv_recomputed_blocks": "evicted KV blocks dropped because recomputing them costs less than moving them",
    "kv_swap_seconds_per_block": "measured seconds to copy a KV block down and back up",
    "kv_fetch_seconds_per_block": "measured seconds to bring a KV block back up",
}


def watch_engine(registry: CollectorRegistry, stats: Callable[[], dict], speculative: str) -> None:
    """Gauges read from the engine's stats at scrape time, with its speculation and expert figures if any."""
    gauges = ENGINE_GAUGES | (TIER_GAUGES if "kv_host_blocks" in stats() else {})
    for key, help_text in gauges.items():
        Gauge(f"xllm_worker_{key}", help_text, registry=registry).set_function(lambda k=key: stats()[k])
    if speculative != "none":
        registry.register(SpeculationCollector(speculative, stats))
    if "eplb_imbalance" in stats():
        registry.register(ExpertBalanceCollector(stats))


def heartbeat_counters(stats: dict, registry: CollectorRegistry) -> dict[str, float]:
    """Cumulative figures for the registry entry: prefix cache, preemptions, busy time, KV hand-offs, and the
    second KV tier's, speculation, image and expert-balancing counters the engine has."""
    sample = registry.get_sample_value
    return {
        "prefix_queries": stats["prefix_queries"],
        "prefix_hits": stats["prefix_hits"],
        "preemptions": stats["preemptions"],
        "busy_seconds": stats["busy_seconds"],
        "kv_transfer_bytes": sample("xllm_kv_transfer_bytes_total"),
        "kv_transfer_seconds": sample("xllm_kv_transfer_seconds_sum"),
        **{key: value for key, value in stats.items() if key.startswith(("spec_", "image")) or key in TIER_GAUGES},
        **{key: stats[key] for key in ("eplb_rebalances", "eplb_move_seconds") if key in stats},
    }

"""shared/metrics.py: a service's stats() as Prometheus gauges, and /metrics served over HTTP."""

import aiohttp
from prometheus_client import CollectorRegistry, Counter, generate_latest

from shared.metrics import ExpertBalanceCollector, SpeculationCollector, StatsCollector, serve_metrics


def test_stats_render_numbers_and_kinds() -> None:
    stats = {"routed": 3, "failures": {"overloaded": 2}}
    registry = CollectorRegistry()
    registry.register(StatsCollector("xllm_router", lambda: stats))
    stats["failures"]["no_instances"] = 1  # read at scrape time: keys that appear later are there
    text = generate_latest(registry).decode()
    assert "xllm_router_routed 3.0" in text
    assert 'xllm_router_failures{kind="overloaded"} 2.0' in text
    assert 'xllm_router_failures{kind="no_instances"} 1.0' in text
    assert "# TYPE xllm_router_failures gauge" in text


def test_speculation_counters_per_method() -> None:
    stats = {"spec_drafted_tokens": 40, "spec_accepted_tokens": 30, "spec_verifications": 10}
    registry = CollectorRegistry()
    registry.register(SpeculationCollector("ngram", lambda: stats))
    text = generate_latest(registry).decode()
    assert 'xllm_spec_draft_tokens_total{method="ngram"} 40.0' in text
    assert 'xllm_spec_accepted_tokens_total{method="ngram"} 30.0' in text
    assert 'xllm_spec_verifications_total{method="ngram"} 10.0' in text
    assert 'xllm_spec_mean_acceptance_length{method="ngram"} 4.0' in text


def test_expert_balance_per_layer() -> None:
    stats = {
        "eplb_imbalance": {1: 1.5, 3: 1.02},
        "eplb_rebalances": 2,
        "eplb_move_seconds": 0.25,
        "eplb_unpaid_moves": 1,
    }
    registry = CollectorRegistry()
    registry.register(ExpertBalanceCollector(lambda: stats))
    text = generate_latest(registry).decode()
    assert 'xllm_eplb_imbalance{layer="1"} 1.5' in text and 'xllm_eplb_imbalance{layer="3"} 1.02' in text
    assert "xllm_eplb_rebalances_total 2.0" in text and "xllm_eplb_move_seconds_total 0.25" in text
    assert "xllm_eplb_unpaid_moves_total 1.0" in text


async def test_serve_metrics_over_http() -> None:
    registry = CollectorRegistry()
    Counter("up_total", "up", registry=registry).inc()
    runner = await serve_metrics(registry, 0, "127.0.0.1")
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        assert "up_total 1.0" in text and "up_created" not in text  # no *_created series
    finally:
        await runner.cleanup()

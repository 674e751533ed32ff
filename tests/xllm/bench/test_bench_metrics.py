"""Pure arithmetic of the harness: goodput under SLOs, arrival generation, summaries."""

import math

import numpy as np
import pytest

from xllm.bench.arrivals import arrival_times
from xllm.bench.client import RequestResult
from xllm.bench.metrics import meets_slo, parse_goodput, summarize


def result(ttft_ms: float, tpot_ms: float, out: int = 11, ok: bool = True) -> RequestResult:
    ttft, tpot = ttft_ms / 1000, tpot_ms / 1000
    return RequestResult(
        ok=ok,
        ttft=ttft,
        e2e=ttft + tpot * (out - 1),
        output_tokens=out,
        chunks=out,
        usage_reported=True,
        error=None if ok else "http_500",
    )


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(["ttft:500,e2el:2000"]) == {"ttft": 500.0, "e2e": 2000.0}
    assert parse_goodput(None) == {}
    for bad in (["ttft=500"], ["foo:1"], ["tpot:x"], ["ttft:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_goodput_counts_only_requests_meeting_every_limit():
    slo = parse_goodput(["ttft:500", "tpot:50"])
    rs = [
        result(100, 20),  # good
        result(499, 49.9),  # good (limits are inclusive)
        result(600, 20),  # TTFT too slow
        result(100, 60),  # TPOT too slow
        result(100, 20, ok=False),  # failed requests never count
        result(100, 999, out=1),  # one token: TPOT undefined, counts as 0
    ]
    assert [meets_slo(r, slo) for r in rs] == [True, True, False, False, False, True]
    s = summarize(rs, duration_s=2.0, slo_ms=slo)
    assert s["goodput"]["good_requests"] == 3
    assert s["goodput"]["request_goodput"] == pytest.approx(1.5)
    assert s["goodput"]["attainment"] == pytest.approx(3 / 6)
    assert s["completed"] == 5 and s["errors"] == {"http_500": 1}
    assert s["tpot_ms"]["p50"] == pytest.approx(34.95)  # TPOTs of the ok requests: 20, 20, 49.9, 60
    assert "goodput" not in summarize(rs, 2.0, {})


def test_throughputs():
    rs = [result(100, 10, out=20), result(100, 10, out=30)]
    for r in rs:
        r.prompt_tokens = 100
    s = summarize(rs, duration_s=4.0, slo_ms={})
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(50 / 4)
    assert s["total_token_throughput"] == pytest.approx(250 / 4)
    assert s["mean_output_tokens"] == 25


def test_poisson_arrivals_seeded_with_mean_rate():
    t = arrival_times(20001, rate=10.0, burstiness=1.0, rng=np.random.default_rng(7))
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    assert t == arrival_times(20001, 10.0, 1.0, np.random.default_rng(7))  # same seed, same arrivals
    assert t != arrival_times(20001, 10.0, 1.0, np.random.default_rng(8))


def test_gamma_burstiness_keeps_rate_changes_spread():
    for shape in (0.25, 4.0):
        gaps = np.diff(arrival_times(40001, 5.0, shape, np.random.default_rng(1)))
        assert gaps.mean() == pytest.approx(0.2, rel=0.05)  # the rate does not depend on burstiness
        cv = gaps.std() / gaps.mean()
        assert cv == pytest.approx(1 / math.sqrt(shape), rel=0.07)  # gamma: CV = 1/sqrt(shape)


def test_infinite_rate_sends_all_at_once():
    assert arrival_times(4, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 4
    assert arrival_times(0, 1.0, 1.0, np.random.default_rng(0)) == []
    with pytest.raises(ValueError):
        arrival_times(3, -1.0, 1.0, np.random.default_rng(0))

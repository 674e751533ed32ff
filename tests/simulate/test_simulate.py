"""The cluster simulator (xllm/simulate): exact step timings on hand-checkable cases, a split's KV transfer,
chunked prefill, an adaptive role switch, reproducible traces, and the command. No bus, no torch."""

import json
import logging

import pytest
import structlog

from shared.cost_model import CostModel
from shared.logging import configure_logging
from xllm.simulate import instance
from xllm.simulate.cli import main as simulate_main
from xllm.simulate.cluster import ClusterConfig, simulate
from xllm.simulate.trace import TraceRequest, make_trace

# step = 10 ms + 1 ms a sequence + 0.1 ms a token + 1e-7 s x chunk x context + 1e-5 s a decode-held token
M = CostModel(step=0.01, seq=0.001, token=0.0001, attention=1e-7, context=1e-5)


@pytest.fixture(autouse=True)
def quiet_router():
    """The router logs a line per request: errors only here (as the command does), as it was after."""
    config, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("test-simulate", "error")
    yield
    structlog.configure(**config)
    root.handlers, root.level = handlers, level


def decode_s(seqs: int, held: int) -> float:
    return 0.01 + 0.0011 * seqs + 1e-5 * held


def test_one_request_comes_out_exactly():
    r = simulate([TraceRequest(0.0, 100, 5)], M, ClusterConfig(instances=1)).records[0]
    prefill = 0.01 + 0.001 + 0.0001 * 100 + 1e-7 * 100 * 100
    decodes = sum(decode_s(1, held) for held in (101, 102, 103, 104))  # prompt + tokens so far
    assert r.path == "whole" and r.error is None
    assert r.ttft == pytest.approx(prefill, abs=1e-12)
    assert r.finish == pytest.approx(prefill + decodes, abs=1e-12)
    assert r.tpot == pytest.approx(decodes / 4, abs=1e-12)


def test_chunked_prefill_under_a_token_budget():
    config = ClusterConfig(instances=1, max_batched_tokens=64, max_num_seqs=4)
    a, b = simulate([TraceRequest(0.0, 100, 2), TraceRequest(0.0, 50, 2)], M, config).records
    t1 = 0.01 + 0.001 + 0.0064 + 1e-7 * 64 * 64  # A's first 64 tokens
    t2 = t1 + 0.01 + 0.002 + 0.0064 + 1e-7 * (36 * 100 + 28 * 28)  # A's last 36, B's first 28: A's first token
    t3 = t2 + 0.01 + 0.002 + 0.0023 + 1e-7 * 22 * 50 + 1e-5 * 101  # A decodes (done), B's last 22
    t4 = t3 + decode_s(1, 51)
    assert (a.first, a.finish, b.first, b.finish) == pytest.approx((t2, t3, t3, t4), abs=1e-12)


def test_a_split_request_pays_the_kv_transfer():
    config = ClusterConfig(policy="split", instances=2, kv_bytes_per_token=1000, kv_bandwidth=1e6, kv_latency_s=0.005)
    r = simulate([TraceRequest(0.0, 100, 3)], M, config).records[0]
    first = 0.01 + 0.001 + 0.01 + 0.001  # on the prefill instance
    arrives = first + 0.005 + 1000 * 100 / 1e6
    assert r.path == "split"
    assert r.ttft == pytest.approx(first, abs=1e-12)
    assert r.finish == pytest.approx(arrives + decode_s(1, 101) + decode_s(1, 102), abs=1e-12)


def test_the_router_refuses_by_the_ttft_target():
    config = ClusterConfig(instances=1, slo_ttft_ms=10)  # the prompt alone needs 22 ms
    (r,) = simulate([TraceRequest(0.0, 100, 5)], M, config).records
    assert r.error == "slo_unattainable" and r.first is None


def test_decode_runs_priced_in_closed_form_match_step_by_step(monkeypatch):
    trace = make_trace("chat", 2.0, 10.0, seed=5)
    config = ClusterConfig(instances=2, max_num_seqs=8)
    fast = simulate(trace, M, config)
    monkeypatch.setattr(instance, "MAX_RUN_STEPS", 1)
    slow = simulate(trace, M, config)
    assert fast.events < slow.events / 5
    assert all(r.finish is not None for r in fast.records)
    times = [[t for r in result.records for t in (r.first, r.finish)] for result in (fast, slow)]
    assert times[0] == pytest.approx(times[1], rel=1e-9)


def test_adaptive_switches_a_prefill_instance_to_decode_under_decode_load():
    trace = [TraceRequest(0.1 * i, 32, 400) for i in range(60)]  # short prompts, long answers
    config = ClusterConfig(policy="adaptive", instances=4, prefill_share=0.75, slo_ttft_ms=5000, slo_tpot_ms=20)
    result = simulate(trace, M, config)
    assert result.switches["decode"] >= 1
    assert all(r.finish is not None for r in result.records)  # nothing lost across the switch


def test_seeded_traces_are_reproducible():
    a = make_trace("chat:0.5,code:0.5", 5.0, 100.0, seed=3, burstiness=0.5)
    assert a == make_trace("chat:0.5,code:0.5", 5.0, 100.0, seed=3, burstiness=0.5)
    assert a != make_trace("chat:0.5,code:0.5", 5.0, 100.0, seed=4, burstiness=0.5)
    assert [r.arrival for r in a] == sorted(r.arrival for r in a) and a[-1].arrival < 100.0
    assert 0.8 * 5.0 * 100 < len(a) < 1.2 * 5.0 * 100

    def mean_prompt(mix: str) -> float:
        trace = make_trace(mix, 5.0, 100.0, seed=3)
        return sum(r.prompt_tokens for r in trace) / len(trace)

    assert mean_prompt("chat") < 700 < 1200 < mean_prompt("code") < 2000 < 3000 < mean_prompt("long-document")
    swing = make_trace("chat", 10.0, 100.0, seed=3, diurnal_amplitude=0.9)  # peak in the first half
    assert sum(r.arrival < 50 for r in swing) > 2 * sum(r.arrival >= 50 for r in swing)


def test_the_command_prints_a_table_per_policy(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"fit": M.to_dict(), "max_num_seqs": 16, "samples": []}))
    out = tmp_path / "runs.json"
    args = ["--profile", str(profile), "--instances", "2", "--duration", "10", "--mix", "code"]
    args += ["--slo-ttft-ms", "2000", "--slo-tpot-ms", "100", "--json", str(out)]
    from xllm.cli import main

    assert main(["simulate", *args, "--sweep-rates", "1,2", "--policies", "colocated,split:0.5"]) == 0
    text = capsys.readouterr().out
    assert "colocated" in text and "split:0.5" in text and "goodput" in text
    runs = json.loads(out.read_text())["runs"]
    assert [r["rate"] for r in runs["split:0.5"]] == [1.0, 2.0]
    assert runs["colocated"][0]["summary"]["completed"] > 0
    assert simulate_main([*args, "--policy", "adaptive"]) == 0
    assert "SLO attainment" in capsys.readouterr().out

"""Workload-adaptive PD: split or whole from predicted costs, SLOs, and admission."""

import pytest

from services.router.adaptive import Slo, estimate, hopeless, plan, prefer_whole
from services.router.policy import COLOCATED, DISAGGREGATED
from shared.cost_model import CostModel
from shared.messages import InstanceInfo

# ~ the default model on this machine: 30 ms a step, 0.5 ms a prompt token, quadratic attention.
COST = CostModel(step=0.03, seq=0.0005, token=0.0005, attention=1e-7, context=1e-7).to_dict()


def instance(iid: str, role: str, cost: dict | None = COST, **load) -> InstanceInfo:
    load = {"max_batched_tokens": 2048, **load}
    return InstanceInfo(iid, role, "m", 1, "h", cost=cost or {}, load=load)


def nothing_recent(iid: str) -> tuple[int, float]:
    return 0, 0.0


def choose(ranked, prompt=512, cached=None, slo=None, priority=0, adaptive=True):
    return plan(DISAGGREGATED, ranked, prompt, cached or {}, nothing_recent, slo or Slo(), priority, adaptive)


def test_an_instance_without_a_fitted_model_predicts_nothing():
    assert estimate(instance("p", "prefill", cost=None), 100) is None


def test_ttft_counts_the_queue_ahead_the_prompt_and_the_decodes_each_step_carries():
    model = CostModel.from_dict(COST)
    idle = estimate(instance("p", "prefill"), 512)
    assert idle.ttft_s == pytest.approx(model.prefill_work(512) + model.step + model.seq)
    queued = estimate(instance("p", "prefill", prefill_tokens=4096, prefill_seconds=2.0), 512)
    assert queued.ttft_s == pytest.approx(2.0 + model.prefill_work(512) + 3 * (model.step + model.seq))
    busy = estimate(instance("d", "decode", decode_seqs=32, decode_context_tokens=16000), 512)
    assert busy.ttft_s == pytest.approx(idle.ttft_s + model.decode_step(32, 16000))
    assert busy.imposed_s == pytest.approx(32 * model.prefill_work(512))
    cached = estimate(instance("d", "decode"), 512, cached_tokens=480)
    assert cached.ttft_s < idle.ttft_s / 5


def test_idle_prefill_and_decode_keep_the_split():
    p, d = instance("p", "prefill"), instance("d", "decode")
    chosen = choose([p, d])
    assert (chosen.path, chosen.entry, chosen.decode) == (DISAGGREGATED, [p], d)


def test_a_backlogged_prefill_instance_sends_the_prompt_whole_to_a_quiet_decode_instance():
    p = instance("p", "prefill", prefill_tokens=8000, prefill_seconds=5.0)
    d = instance("d", "decode", decode_seqs=2, decode_context_tokens=600)
    chosen = choose([p, d])
    assert (chosen.path, chosen.entry, chosen.decode) == (COLOCATED, [d], None)


def test_a_long_prompt_stays_off_a_decode_instance_with_many_running_decodes():
    p = instance("p", "prefill", prefill_tokens=1000, prefill_seconds=0.6)
    d = instance("d", "decode", decode_seqs=48, decode_context_tokens=30000)
    assert choose([p, d], prompt=2000).path == DISAGGREGATED


def test_a_prompt_cached_on_the_decode_instance_goes_there_whole():
    p = instance("p", "prefill", prefill_tokens=2048, prefill_seconds=1.2)
    d = instance("d", "decode", decode_seqs=4, decode_context_tokens=2000)
    assert choose([p, d], prompt=1024).path == DISAGGREGATED
    assert choose([p, d], prompt=1024, cached={"d": 1008}).path == COLOCATED


def test_the_tpot_target_keeps_a_prompt_off_decodes_it_would_slow_past_it():
    p = instance("p", "prefill", prefill_tokens=6000, prefill_seconds=4.0)
    d = instance("d", "decode", decode_seqs=4, decode_context_tokens=2000)
    assert choose([p, d], prompt=1024).path == COLOCATED
    step = estimate(d, 1024).step_s
    assert choose([p, d], prompt=1024, slo=Slo(tpot_s=step * 0.9)).path == DISAGGREGATED
    assert choose([p, d], prompt=1024, slo=Slo(tpot_s=step * 1.1)).path == COLOCATED


def test_the_ttft_target_picks_the_path_that_meets_it():
    # Whole costs more in all (it delays 40 decodes) but only it meets the TTFT target.
    p = instance("p", "prefill", prefill_tokens=2000, prefill_seconds=1.5)
    d = instance("d", "decode", decode_seqs=40, decode_context_tokens=8000)
    split, whole = estimate(p, 256), estimate(d, 256)
    assert whole.cost > split.cost and whole.ttft_s < split.ttft_s
    assert not prefer_whole(split, whole, Slo())
    assert prefer_whole(split, whole, Slo(ttft_s=(split.ttft_s + whole.ttft_s) / 2))


def test_without_models_the_fixed_rule_holds_and_nothing_is_refused():
    p, d = instance("p", "prefill", cost=None), instance("d", "decode", cost=None)
    chosen = choose([p, d], slo=Slo(ttft_s=0.001))
    assert (chosen.path, chosen.retry_after_s) == (DISAGGREGATED, None)


def test_the_fixed_modes_never_switch_paths():
    p = instance("p", "prefill", prefill_tokens=8000, prefill_seconds=5.0)
    d = instance("d", "decode")
    assert choose([p, d], adaptive=False).path == DISAGGREGATED


def test_an_online_request_that_cannot_meet_the_ttft_target_is_refused_with_a_retry_time():
    p = instance("p", "prefill", prefill_tokens=8000, prefill_seconds=5.0)
    d = instance("d", "decode", decode_seqs=60, decode_context_tokens=60000)
    chosen = choose([p, d], prompt=2048, slo=Slo(ttft_s=0.5))
    assert chosen.retry_after_s == pytest.approx(chosen.estimate.ttft_s - 0.5)
    assert choose([p, d], prompt=2048, slo=Slo(ttft_s=0.5), priority=1).retry_after_s is None  # offline waits
    assert choose([p, d], prompt=2048, slo=Slo(ttft_s=0.5, reject_factor=100)).retry_after_s is None
    assert choose([p, d], prompt=2048).retry_after_s is None  # no target


def test_colocated_instances_are_admitted_the_same_way():
    c = instance("c", "colocated", prefill_tokens=8000, prefill_seconds=5.0)
    chosen = plan(COLOCATED, [c], 512, {}, nothing_recent, Slo(ttft_s=1.0))
    assert chosen.entry == [c] and chosen.retry_after_s > 4


def test_what_this_router_just_sent_counts_as_queued():
    p = instance("p", "prefill")
    d = instance("d", "decode", decode_seqs=1, decode_context_tokens=100)
    assert choose([p, d]).path == DISAGGREGATED
    recent = {"p": (8000, 5.0)}
    chosen = plan(DISAGGREGATED, [p, d], 512, {}, lambda iid: recent.get(iid, (0, 0.0)), Slo())
    assert chosen.path == COLOCATED
    assert hopeless(None, Slo(ttft_s=0.1), 0) is None


def test_with_every_prefill_instance_full_the_prompt_goes_whole_to_a_decode_instance():
    d = instance("d", "decode", cost=None)  # even before any model: a split is impossible
    chosen = choose([d])
    assert (chosen.path, chosen.entry, chosen.decode) == (COLOCATED, [d], None)
    assert choose([d], adaptive=False).entry == []  # the fixed split has nowhere to start


def test_both_options_are_priced_by_one_model_so_fit_noise_does_not_decide():
    cheaper = CostModel(step=0.02, seq=0.0003, token=0.0003, attention=6e-8, context=6e-8).to_dict()
    p, d = instance("p", "prefill"), instance("d", "decode", cost=cheaper)  # idle, fitted apart
    assert choose([p, d]).path == DISAGGREGATED

"""services.router.policy: path choice and instance ranking, without NATS."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.router.policy import (
    COLOCATED,
    DISAGGREGATED,
    LeastLoadedPolicy,
    PrefixAwarePolicy,
    RecentForwards,
    choose_path,
    held_blocks,
    load_score,
)
from shared.messages import GenerateRequest, InstanceInfo, KvQuery, KvQueryReply


def inst(iid: str, role: str = "colocated", **kw) -> InstanceInfo:
    return InstanceInfo(instance_id=iid, role=role, model="m", pid=1, host="h", **kw)


def request(tokens: int = 40) -> GenerateRequest:
    return GenerateRequest("r1", list(range(tokens)), {}, reply_subject="inbox.r1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def ids(policy, instances, req=None) -> list[str]:
    return [i.instance_id for i in await policy.rank(instances, req or request())]


# -- choose_path ----------------------------------------------------------------------------------------


def test_auto_prefers_disaggregated_when_both_roles_are_ready() -> None:
    both = [inst("p", "prefill"), inst("d", "decode"), inst("c")]
    assert choose_path("auto", both) == DISAGGREGATED
    assert choose_path("auto", [inst("p", "prefill"), inst("c")]) == COLOCATED
    assert choose_path("auto", [inst("p", "prefill"), inst("d", "decode", state="starting"), inst("c")]) == COLOCATED
    assert choose_path("auto", [inst("p", "prefill"), inst("d", "decode")]) == DISAGGREGATED
    assert choose_path("auto", []) is None
    assert choose_path("auto", [inst("c", state="draining")]) is None


def test_forced_modes_need_their_roles() -> None:
    both = [inst("p", "prefill"), inst("d", "decode"), inst("c")]
    assert choose_path("colocated", both) == COLOCATED
    assert choose_path("disaggregated", both) == DISAGGREGATED
    assert choose_path("colocated", both[:2]) is None
    assert choose_path("disaggregated", [inst("p", "prefill"), inst("c")]) is None


# -- least-loaded ---------------------------------------------------------------------------------------


async def test_least_loaded_orders_by_running_waiting_and_kv_fullness() -> None:
    policy = LeastLoadedPolicy(rng=random.Random(0))
    instances = [
        inst("busy", running=4),
        inst("queued", running=1, waiting=2),  # 1 + 2*2 = 5: waiting weighs more than running
        inst("idle"),
        inst("kv-full", running=1, free_blocks=0, total_blocks=100),  # 1 + 4 = 5.0
        inst("kv-half", running=1, free_blocks=50, total_blocks=100),  # 1 + 2 = 3.0
    ]
    order = await ids(policy, instances)
    assert order[:3] == ["idle", "kv-half", "busy"]
    assert set(order[3:]) == {"queued", "kv-full"}


def test_load_score_treats_unknown_capacity_as_empty() -> None:
    assert load_score(inst("a", running=2, total_blocks=0)) == 2.0
    assert load_score(inst("a", free_blocks=25, total_blocks=100)) == pytest.approx(3.0)
    assert load_score(inst("a", waiting=1), recent=3) == 5.0


async def test_recent_forwards_spread_a_burst_between_heartbeats() -> None:
    clock = FakeClock()
    recent = RecentForwards(window_s=1.0, clock=clock)
    policy = LeastLoadedPolicy(recent, rng=random.Random(0))
    instances = [inst("a", running=2), inst("b")]
    picks = []
    for _ in range(6):
        best = (await ids(policy, instances))[0]
        recent.record(best)
        picks.append(best)
    assert picks[:2] == ["b", "b"]  # b (0, then 1) is below a (2)
    assert picks.count("a") == 2  # then, at equal load, they take turns
    clock.now += 1.5  # the window passed: the next heartbeat shows that load, the count forgets it
    assert recent.count("b") == 0
    assert (await ids(policy, instances))[0] == "b"


def test_recent_forwards_forget_departed_instances() -> None:
    recent = RecentForwards(window_s=10.0)
    recent.record("a")
    recent.record("a")
    recent.record("b")
    assert (recent.count("a"), recent.count("b")) == (2, 1)
    recent.retain(["a"])
    assert (recent.count("a"), recent.count("b")) == (2, 0)


async def test_ties_are_broken_at_random_but_every_instance_is_kept() -> None:
    policy = LeastLoadedPolicy(rng=random.Random(1))
    instances = [inst(f"w{i}") for i in range(4)]
    firsts = set()
    for _ in range(40):
        order = await ids(policy, instances)
        assert sorted(order) == ["w0", "w1", "w2", "w3"]
        firsts.add(order[0])
    assert len(firsts) > 1


# -- prefix-aware ---------------------------------------------------------------------------------------


def kv_reply(matches: dict[str, int], num_blocks: int = 2, error: str | None = None, tiers: dict | None = None):
    queries: list[KvQuery] = []

    async def query(q: KvQuery) -> KvQueryReply:
        queries.append(q)
        return KvQueryReply(q.request_id, matches=matches, tiers=tiers or {}, num_blocks=num_blocks, error=error)

    return query, queries


async def test_prefix_aware_prefers_the_cached_instance_at_equal_load() -> None:
    query, queries = kv_reply({"b": 2})
    policy = PrefixAwarePolicy(query, rng=random.Random(0))
    assert await ids(policy, [inst("a"), inst("b")], request(40)) == ["b", "a"]
    assert queries[0].token_ids == list(range(40)) and queries[0].block_size == 16
    assert (policy.queries, policy.fallbacks) == (1, 0)


async def test_prefix_bonus_is_weighed_against_load() -> None:
    query, _ = kv_reply({"b": 1})  # half the prompt: 0.5 * 4 = 2 load units
    policy = PrefixAwarePolicy(query, rng=random.Random(0))
    assert await ids(policy, [inst("a"), inst("b", running=1)]) == ["b", "a"]  # 1 - 2 < 0
    assert await ids(policy, [inst("a"), inst("b", running=3)]) == ["a", "b"]  # 3 - 2 > 0


@pytest.mark.parametrize("failure", ["raises", "error_reply", "hangs"])
async def test_prefix_aware_falls_back_to_least_loaded(failure: str) -> None:
    async def query(q: KvQuery) -> KvQueryReply:
        if failure == "raises":
            raise ConnectionError("no kvcache service")
        if failure == "hangs":
            return await asyncio.wait_for(asyncio.sleep(10), 0.01)  # what a request timeout looks like
        return KvQueryReply(q.request_id, matches={"b": 2}, num_blocks=2, error="index not ready")

    policy = PrefixAwarePolicy(query, rng=random.Random(0))
    assert await ids(policy, [inst("a"), inst("b", running=1)]) == ["a", "b"]
    assert policy.fallbacks == 1


async def test_prefix_aware_skips_the_query_for_prompts_under_one_block() -> None:
    query, queries = kv_reply({"b": 1})
    policy = PrefixAwarePolicy(query, rng=random.Random(0))
    assert await ids(policy, [inst("a"), inst("b", running=1)], request(15)) == ["a", "b"]
    assert queries == []


def test_recent_work_drains_as_the_instance_would_work_through_it():
    now = [0.0]
    recent = RecentForwards(window_s=10.0, clock=lambda: now[0])
    recent.record("a", tokens=100, seconds=0.4)
    recent.record("a", tokens=100, seconds=0.4)  # at once: 0.8 s queued
    assert recent.work("a") == (200, pytest.approx(0.8))
    now[0] = 0.6
    assert recent.work("a") == (50, pytest.approx(0.2))  # three quarters done
    now[0] = 1.0
    recent.record("a", tokens=100, seconds=0.4)  # the first two are done: only this one is ahead
    assert recent.work("a") == (100, pytest.approx(0.4))
    assert recent.work("b") == (0, 0.0)


def test_a_second_tier_block_counts_for_what_bringing_it_up_saves() -> None:
    cost = {"step": 0.0, "seq": 0.0, "token": 0.001, "attention": 0.0, "context": 0.0}  # 16 ms to recompute a block
    measured = inst("a", cost=cost, counters={"kv_fetch_seconds_per_block": 0.004})
    assert held_blocks(measured, {"device": 2, "host": 4}) == pytest.approx(2 + 4 * 0.75)
    slow = inst("a", cost=cost, counters={"kv_fetch_seconds_per_block": 0.032})
    assert held_blocks(slow, {"device": 2, "host": 4}) == 2  # slower to bring up than to recompute: worth nothing
    assert held_blocks(inst("a"), {"device": 2, "host": 4}) == 6  # nothing measured yet: as good as the pool's


async def test_prefix_aware_prefers_a_pool_hit_to_an_equal_second_tier_hit() -> None:
    cost = {"step": 0.0, "seq": 0.0, "token": 0.001, "attention": 0.0, "context": 0.0}
    tiered = {"kv_fetch_seconds_per_block": 0.008}
    query, _ = kv_reply({"a": 2, "b": 2}, tiers={"a": {"host": 2}, "b": {"device": 2}})
    policy = PrefixAwarePolicy(query, rng=random.Random(0))
    instances = [inst("a", cost=cost, counters=tiered), inst("b", cost=cost, counters=tiered, running=3)]
    assert await policy.cached_tokens(instances, request(40)) == {"a": 16, "b": 32}
    assert await ids(policy, instances) == ["a", "b"]  # bonuses 2 and 4 load units: 0 - 2 < 3 - 4
    instances[1].running = 1
    assert await ids(policy, instances) == ["b", "a"]  # 1 - 4 < 0 - 2

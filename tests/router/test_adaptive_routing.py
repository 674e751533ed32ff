"""The router service choosing paths from the costs instances report, and refusing by the TTFT target
(fake workers over a real nats-server: tests/router/fakes.py)."""

import pytest

from shared.cost_model import CostModel
from shared.errors import ApiError
from tests.router.fakes import Cluster

pytestmark = pytest.mark.integration

COST = CostModel(step=0.03, seq=0.0005, token=0.0005, attention=1e-7, context=1e-7).to_dict()
BACKLOG = {"prefill_tokens": 8000, "prefill_seconds": 5.0, "max_batched_tokens": 2048}


async def test_a_backlogged_prefill_instance_makes_the_router_send_the_prompt_whole_to_decode(
    cluster: Cluster,
) -> None:
    await cluster.add("p", "prefill", cost=COST, load=BACKLOG)
    d = await cluster.add("d", "decode", cost=COST, load={"decode_seqs": 1, "decode_context_tokens": 50})
    router = await cluster.start_router()
    reply, chunks = await cluster.send()
    assert reply.error is None and reply.instances == [d] and chunks == []
    assert cluster.workers["d"].received[0].decode_instance is None
    assert cluster.workers["p"].received == []
    assert router.stats()["paths"] == {"colocated": 1}


async def test_the_disaggregated_mode_splits_whatever_the_costs(cluster: Cluster) -> None:
    p = await cluster.add("p", "prefill", cost=COST, load=BACKLOG)
    d = await cluster.add("d", "decode", cost=COST, load={})
    router = await cluster.start_router(mode="disaggregated")
    reply, _ = await cluster.send()
    assert reply.instances == [p, d] and router.stats()["paths"] == {"disaggregated": 1}


async def test_a_request_that_cannot_meet_the_ttft_target_gets_429_with_retry_after(cluster: Cluster) -> None:
    await cluster.add("c", cost=COST, load=BACKLOG)
    router = await cluster.start_router(slo_ttft_ms=500)
    reply, chunks = await cluster.send()
    error = ApiError.from_wire(reply.error, retry_after=1)
    assert (error.status, error.code) == (429, "slo_unattainable")
    assert error.retry_after >= 5  # the 5 s of prefill queued ahead
    assert chunks[-1].finished and chunks[-1].error["code"] == "slo_unattainable"
    assert cluster.workers["c"].received == []
    assert router.stats()["paths"] == {"refused": 1} and router.failures["slo"] == 1

    reply, _ = await cluster.send(priority=1)  # offline: no target, it queues
    assert reply.error is None


async def test_when_the_prefill_instances_are_at_their_waiting_cap_the_prompt_goes_whole(cluster: Cluster) -> None:
    await cluster.add("p", "prefill", waiting=70)  # past the default cap of 64
    d = await cluster.add("d", "decode")
    adaptive = await cluster.start_router()
    reply, _ = await cluster.send()
    assert reply.error is None and reply.instances == [d]
    await adaptive.stop()
    fixed = await cluster.start_router(mode="disaggregated")
    reply, _ = await cluster.send()
    assert reply.error["status"] == 429 and fixed.failures["overloaded"] == 1

"""Expert placement (EPLB) and expert parallelism over real processes joined by torch.distributed (gloo)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import torch

from services.worker.async_engine import AsyncEngine, EngineLostError
from shared.engine.config import EngineConfig
from shared.engine.eplb import ExpertCost, Placement, balanced_placement, default_placement, imbalance
from shared.engine.expert_balancer import ExpertBalancer
from shared.engine.expert_parallel import ExpertGroup, ExpertGroupError, plan_moves
from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import load_checkpoint
from shared.engine.moe import SparseMoeBlock
from tests.engine.helpers import greedy, make_engine, run_all
from tests.engine.test_reference import PROMPTS, hf_greedy
from tests.waiting import until
from xllm.bench.local_system import start_system, stop_system
from xllm.natsd import free_port


# ---- placement ------------------------------------------------------------------------------------
def test_default_placement_splits_experts_in_order():
    p = default_placement(8, 2, num_redundant=2)
    assert p.slots == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    replicas, copies = p.routing_table()
    assert copies.tolist() == [2, 2, 1, 1, 1, 1, 1, 1] and replicas[0].tolist() == [0, 8]
    with pytest.raises(ValueError, match="do not split evenly"):
        default_placement(8, 3)


@pytest.mark.parametrize("ranks,redundant", [(2, 0), (2, 2), (4, 4)])
def test_balanced_placement_evens_out_a_skewed_load(ranks, redundant):
    # a Zipf-like skew: expert 0 takes a third of the tokens
    load = torch.tensor([1000, 400, 300, 200, 150, 120, 100, 90, 80, 70, 60, 50, 40, 30, 20, 10])
    before = imbalance(default_placement(16, ranks, redundant).rank_loads(load, ranks))
    placement = balanced_placement(load, ranks, redundant)
    after = imbalance(placement.rank_loads(load, ranks))
    assert sorted(set(placement.slots)) == list(range(16)) and len(placement.slots) == 16 + redundant
    assert after < before and after <= (1.15 if redundant else 1.35), (before, after)
    per_rank = len(placement.slots) // ranks
    for r in range(ranks):  # no rank holds two copies of one expert
        share = placement.slots[r * per_rank : (r + 1) * per_rank]
        assert len(set(share)) == len(share)


def test_routing_spreads_tokens_over_an_experts_copies():
    from shared.engine.config import ModelConfig

    config = ModelConfig("qwen3_moe", 10, 8, 8, 1, 1, 1, 8, 16, num_experts=4, num_experts_per_tok=1)
    block = SparseMoeBlock(config, 0)
    block.placement = default_placement(4, 2, num_redundant=2)  # experts 0 and 1 have two copies
    block.replicas, block.copies = block.placement.routing_table()
    slots = block.route(torch.tensor([[0], [0], [0], [0], [3]]))
    assert slots.flatten().tolist() == [0, 4, 0, 4, 3]


# ---- expert parallelism ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("qwen3_moe")))


@pytest.mark.parametrize("world,redundant", [(2, 0), (2, 2)])
def test_expert_parallel_output_equals_transformers(moe_ckpt, tiny_hf_model, world, redundant):
    engine = make_engine(moe_ckpt, expert_parallel=world, num_redundant_experts=redundant)
    try:
        prompts = {str(i): (moe_ckpt.tokenizer.encode(p), greedy(12)) for i, p in enumerate(PROMPTS)}
        got = run_all(engine, prompts)
        model = tiny_hf_model("qwen3_moe")
        for key, (ids, _) in prompts.items():
            assert got[key][0][0] == hf_greedy(model, ids, 12), key
        blocks = [m for m in engine.model.modules() if isinstance(m, SparseMoeBlock)]
        assert len(blocks[0].experts.slot_experts) == (8 + redundant) // world  # rank 0 holds only its share
    finally:
        followers = list(engine.expert_balancer.group.followers)
        engine.close()
    assert [f.returncode for f in followers] == [0] * (world - 1)


def test_a_lost_rank_breaks_the_group_with_a_clear_error(moe_ckpt):
    engine = make_engine(moe_ckpt, expert_parallel=2)
    try:
        engine.expert_balancer.group.followers[0].kill()
        engine.expert_balancer.group.followers[0].wait()
        engine.add_request("a", moe_ckpt.tokenizer.encode(PROMPTS[0]), greedy(4))
        with pytest.raises(ExpertGroupError, match="expert-parallel group broken"):
            engine.step()
    finally:
        engine.close()


async def test_an_engine_that_lost_a_rank_refuses_what_comes_after_at_once(moe_ckpt):
    """Between the loss and the worker leaving the registry, the router may still send it requests: they
    fail at once (the worker refuses them, the router tries another instance), and never wait on an engine
    thread that has stopped."""
    engine = AsyncEngine(make_engine(moe_ckpt, expert_parallel=2))
    lost = asyncio.Event()
    engine.on_lost = lambda error: lost.set()
    await engine.start()
    try:
        async with asyncio.timeout(60):  # a bound: before the fix, "b" and the call waited forever
            engine.engine.expert_balancer.group.followers[0].kill()
            running = engine.add_request("a", moe_ckpt.tokenizer.encode(PROMPTS[0]), greedy(4))
            with pytest.raises(EngineLostError, match="expert-parallel group broken"):
                async for _ in engine.outputs("a", running):
                    pass
            await lost.wait()
            later = engine.add_request("b", moe_ckpt.tokenizer.encode(PROMPTS[1]), greedy(4))
            with pytest.raises(EngineLostError):
                async for _ in engine.outputs("b", later):
                    pass
            with pytest.raises(EngineLostError):
                await engine.call(lambda e: e.stats())
    finally:
        await engine.stop()


def test_a_failure_between_collectives_breaks_the_group_and_close_ends_it(moe_ckpt, monkeypatch):
    """Rank 0 failing after the broadcast leaves the follower waiting in the reduce: the group is out of
    step, so closing it kills the followers instead of sending them a command."""
    engine = make_engine(moe_ckpt, expert_parallel=2)
    follower = engine.expert_balancer.group.followers[0]
    try:
        block = next(m for m in engine.model.modules() if isinstance(m, SparseMoeBlock))
        monkeypatch.setattr(block.experts, "forward", lambda *a: 1 / 0)
        engine.add_request("a", moe_ckpt.tokenizer.encode(PROMPTS[0]), greedy(4))
        with pytest.raises(ExpertGroupError, match="division by zero"):
            engine.step()
    finally:
        engine.close()
    assert follower.poll() is not None


def test_a_move_that_puts_two_copies_on_one_rank_fills_both(moe_ckpt, tiny_hf_model):
    """Packing may put both copies of an expert on one rank (when no other rank has room): the rank
    receives it once and fills the second slot from the first."""
    engine = make_engine(moe_ckpt, expert_parallel=2, num_redundant_experts=2)
    try:
        new = Placement([5, 5, 0, 1, 2, 3, 4, 6, 7, 0], 8)  # rank 0 held 0-4: expert 5 twice, received
        for block in (m for m in engine.model.modules() if isinstance(m, SparseMoeBlock)):
            engine.expert_balancer.group.move_experts(block.layer_index, block.experts, block.placement, new)
            block.use(new)
            prefix = f"model.layers.{block.layer_index}.mlp.experts.5"
            gate_up = torch.cat(
                [moe_ckpt.weights[f"{prefix}.gate_proj.weight"], moe_ckpt.weights[f"{prefix}.up_proj.weight"]]
            )
            for slot in (0, 1):
                assert torch.equal(block.experts.gate_up_proj[slot], gate_up)
                assert torch.equal(block.experts.down_proj[slot], moe_ckpt.weights[f"{prefix}.down_proj.weight"])
        ids = moe_ckpt.tokenizer.encode(PROMPTS[2])
        assert run_all(engine, {"a": (ids, greedy(16))})["a"][0][0] == hf_greedy(tiny_hf_model("qwen3_moe"), ids, 16)
    finally:
        engine.close()


def test_expert_parallel_on_cuda_is_refused_clearly(moe_ckpt):
    with pytest.raises(ValueError, match="runs on the CPU"):
        LLMEngine(EngineConfig(model=moe_ckpt.path, device="cuda", expert_parallel=2), moe_ckpt)


def test_a_rank_that_cannot_start_is_a_clear_error(moe_ckpt, tmp_path):
    with pytest.raises(ExpertGroupError, match="rank 1 failed to start"):
        ExpertGroup.launch(str(tmp_path / "missing"), moe_ckpt.config, EngineConfig(expert_parallel=2), torch.float32)
    assert not torch.distributed.is_initialized()  # nothing half-joined: the next engine may start a group


def test_ranks_started_apart_from_the_engine_join_it_at_its_address(moe_ckpt, tiny_hf_model):
    """Other hosts' ranks are started by hand (here: on this host, apart from the engine), and meet rank 0
    at --expert-parallel-address."""
    address = f"127.0.0.1:{free_port()}"
    args = [moe_ckpt.path, "--rank", "1", "--world-size", "2", "--address", address, "--num-threads", "1"]
    follower = subprocess.Popen([sys.executable, "-m", "shared.engine.expert_parallel", *args])
    engine = make_engine(moe_ckpt, expert_parallel=2, expert_parallel_address=address)
    try:
        ids = moe_ckpt.tokenizer.encode(PROMPTS[1])
        assert run_all(engine, {"a": (ids, greedy(12))})["a"][0][0] == hf_greedy(tiny_hf_model("qwen3_moe"), ids, 12)
        assert engine.expert_balancer.group.followers == []  # none of its own
    finally:
        engine.close()
    assert follower.wait(timeout=30) == 0  # stopped by rank 0


# ---- through `xllm up` ----------------------------------------------------------------------------
def follower_pids(worker_pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == worker_pid and b"shared.engine.expert_parallel" in cmdline:
            pids.append(int(entry.name))
    return pids


async def complete(session, url: str, model: str, prompt: str, max_tokens: int, started) -> tuple[int, str, list]:
    """The status, the text streamed, and the error events that ended the stream early (if any)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as r:
        text, errors = "", []
        async for line in r.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                text += "".join(c["text"] for c in event.get("choices", []))
                errors += [event["error"]] if "error" in event else []
                started.set()
        return r.status, text, errors


@pytest.mark.integration
async def test_xllm_up_serves_a_moe_model_over_expert_parallel_workers_and_fails_over_a_lost_rank(
    tmp_path, tiny_model_dir, moe_ckpt
):
    model = str(tiny_model_dir("qwen3_moe"))
    engine = make_engine(moe_ckpt)
    tokens = 900  # seconds of generation: several heartbeats show which worker is busy
    expected = [
        moe_ckpt.tokenizer.decode(run_all(engine, {"r": (moe_ckpt.tokenizer.encode(p), greedy(tokens))})["r"][0][0])
        for p in PROMPTS
    ]
    args = ["--model", model, "--mode", "colocated", "--decode", "2", "--expert-parallel", "2"]
    args += ["--num-redundant-experts", "2", "--enable-eplb"]
    system = start_system(tmp_path, *args, "--kv-cache-fraction", "0.02", "--worker-threads", "1")
    try:
        workers = system.instances()
        assert len(workers) == 2 and all(len(follower_pids(w["pid"])) == 1 for w in workers)
        assert all("eplb_rebalances" in w["counters"] for w in workers)
        async with aiohttp.ClientSession() as s:
            started = [asyncio.Event() for _ in PROMPTS]
            running = [
                asyncio.create_task(complete(s, system.url, model, p, tokens, e))
                for p, e in zip(PROMPTS, started, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)  # all streaming
            await until(lambda: any(i["load"]["running"] for i in system.instances()), 60, "no worker took a request")
            victim = next(i for i in system.instances() if i["load"]["running"])
            os.kill(follower_pids(victim["pid"])[0], signal.SIGKILL)  # rank 1 of a busy worker's group
            results = await asyncio.wait_for(asyncio.gather(*running), 180)
            async with s.get(f"{system.url}/metrics") as r:
                metrics = await r.text()
        # served across the loss, and equal to EP 1 (else: what the gateway saw, to tell why)
        logs = system.log("gateway") + system.log("router")
        warnings = [line for line in logs.splitlines() if '"warning"' in line or '"error"' in line]
        assert results == [(200, text, []) for text in expected], warnings
        assert 'xllm_gateway_failovers_total{reason="instance_left"}' in metrics
        # the worker left (and `xllm up` started it again, as a new process)
        await until(lambda: victim["pid"] not in [i["pid"] for i in system.instances()], 30, "the worker stayed")
        assert "engine_lost" in system.log(victim["instance_id"].rsplit("-", 1)[0])
    finally:
        stop_system(system.proc)


# ---- rebalancing while serving --------------------------------------------------------------------
def small_block(world: int, redundant: int) -> SparseMoeBlock:
    from shared.engine.config import ModelConfig

    config = ModelConfig(
        "qwen3_moe", 10, 8, 8, 1, 1, 1, 8, 16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=4
    )
    block = SparseMoeBlock(config, 0)
    block.use(default_placement(8, world, redundant))
    block.experts.keep_slots(block.placement.slots[: (8 + redundant) // world])
    return block


def balancer_for(block, seconds_per_pair: float, bytes_per_second: float, seconds_per_expert: float = 0.0):
    cost = ExpertCost()
    cost.per_expert, cost.per_token = seconds_per_expert, seconds_per_pair
    group = SimpleNamespace(world_size=2, cost=cost, bytes_per_second=bytes_per_second)
    return ExpertBalancer(group, [block], num_redundant=2, enabled=True, interval_steps=1)


SKEWED = torch.tensor([900, 500, 100, 80, 60, 40, 20, 10])


def test_a_drifted_layer_is_rebalanced_when_the_move_pays():
    block = small_block(2, 2)
    balancer = balancer_for(block, seconds_per_pair=1e-3, bytes_per_second=1e9)
    layer = balancer.layers[0]
    new = balancer.decide(layer, SKEWED, SKEWED)
    assert new is not None
    before, after = (imbalance(p.rank_loads(SKEWED, 2)) for p in (block.placement, new))
    assert after < before and after <= 1.15


def test_no_rebalance_when_moving_costs_more_than_it_saves():
    block = small_block(2, 2)
    balancer = balancer_for(block, seconds_per_pair=1e-3, bytes_per_second=1.0)  # a byte a second
    assert balancer.decide(balancer.layers[0], SKEWED, SKEWED) is None


def test_a_skew_is_rebalanced_once_it_has_cost_more_than_the_move():
    """Ski rental: each interval of the skew adds the time a balanced placement would have saved."""
    block = small_block(2, 2)
    expert_bytes = 3 * 4 * 8 * 4  # gate, up, down of 4 x 8, fp32
    balancer = balancer_for(block, seconds_per_pair=1e-3, bytes_per_second=expert_bytes / 0.5)  # 0.5 s each
    layer, decisions = balancer.layers[0], []
    for _ in range(40):
        decisions.append(balancer.decide(layer, SKEWED, SKEWED) is not None)
    new = balanced_placement(SKEWED, 2, 2)
    cost_s = len(plan_moves(block.placement, new, 2)) * 0.5  # 4 experts move: 2 s
    shed_s = 1e-3 * float(block.placement.rank_loads(SKEWED, 2).max() - new.rank_loads(SKEWED, 2).max())  # 0.08 s
    regret, expected = 0.0, None
    for i in range(40):
        regret += shed_s
        if regret > cost_s:
            expected = i
            break
    assert expected is not None and expected > 20  # about 2 / 0.08 intervals, not the first
    assert decisions.index(True) == expected and not any(decisions[:expected])


def test_no_rebalance_when_expert_time_is_all_weight_reads():
    """Decode-like steps: every expert runs on every rank whatever the tokens, so evening out the tokens
    saves nothing, and the balancer does not move."""
    block = small_block(2, 2)
    balancer = balancer_for(block, seconds_per_pair=0.0, bytes_per_second=1e9, seconds_per_expert=1e-3)
    assert all(balancer.decide(balancer.layers[0], SKEWED, SKEWED) is None for _ in range(50))


def test_a_move_that_did_not_make_the_layer_faster_doubles_what_the_next_must_pay():
    block = small_block(2, 2)
    seconds_per_token = iter([1.0, 1.0, 0.99, 1.0, 1.0, 1.0, 0.5, 0.5])  # one per interval
    group = SimpleNamespace(
        world_size=2,
        cost=ExpertCost(),
        bytes_per_second=1e9,
        take_wall=lambda layer: next(seconds_per_token),
        move_experts=lambda *args: 0,
    )
    balancer = ExpertBalancer(group, [block], num_redundant=2, enabled=True, interval_steps=1)
    layer = balancer.layers[0]
    for _ in range(2):
        balancer.after_step()
    balancer._move(layer, balanced_placement(SKEWED, 2, 2), SKEWED)
    for _ in range(3):  # the interval the move fell in, then two no faster than before
        balancer.after_step()
    assert layer.cost_factor == 2 and balancer.unpaid == 1
    balancer._move(layer, default_placement(8, 2, 2), SKEWED)
    for _ in range(3):  # now twice as fast
        balancer.after_step()
    assert layer.cost_factor == 1 and balancer.unpaid == 1 and balancer.rebalances == 2


def test_expert_cost_fit_recovers_per_expert_and_per_token_seconds():
    cost = ExpertCost()
    for experts, tokens in [(1, 4), (2, 64), (8, 16), (4, 300), (6, 2), (3, 128), (8, 512), (5, 40)] * 4:
        cost.observe(experts, tokens, 2e-3 * experts + 1e-5 * tokens)
    cost.fit()
    assert cost.per_expert == pytest.approx(2e-3) and cost.per_token == pytest.approx(1e-5)
    seconds = cost.rank_seconds(torch.tensor([[0.5, 3.0], [0.0, 10.0]], dtype=torch.double))
    assert seconds.tolist() == pytest.approx([2e-3 * 1.5 + 1e-5 * 3.5, 2e-3 * 1 + 1e-5 * 10])


def test_no_rebalance_while_the_load_has_not_drifted():
    block = small_block(2, 2)
    balancer = balancer_for(block, seconds_per_pair=1e-3, bytes_per_second=1e9)
    layer = balancer.layers[0]
    layer.placed_for = SKEWED * 2  # the same shape: cosine similarity 1
    assert balancer.decide(layer, SKEWED, SKEWED) is None
    layer.placed_for = SKEWED.flip(0)  # the hot experts changed
    assert balancer.decide(layer, SKEWED, SKEWED) is not None


def test_rebalancing_while_serving_leaves_greedy_output_unchanged(moe_ckpt, tiny_hf_model):
    engine = make_engine(moe_ckpt, expert_parallel=2, num_redundant_experts=2, enable_eplb=True, eplb_interval_steps=2)
    try:
        balancer = engine.expert_balancer
        balancer.group.bytes_per_second = 1e15  # moving looks free: every drift is acted on
        prompts = {str(i): (moe_ckpt.tokenizer.encode(p), greedy(24)) for i, p in enumerate(PROMPTS)}
        got = run_all(engine, prompts)
        assert balancer.rebalances >= 1  # moved while these requests ran
        model = tiny_hf_model("qwen3_moe")
        for key, (ids, _) in prompts.items():
            assert got[key][0][0] == hf_greedy(model, ids, 24), key
        placements = [layer.block.placement.slots for layer in balancer.layers]
        assert placements != [default_placement(8, 2, 2).slots] * len(placements)
        again = run_all(engine, {k: (ids, greedy(24)) for k, (ids, _) in prompts.items()})  # after the moves
        assert again == got
        stats = engine.stats()
        assert stats["eplb_rebalances"] == balancer.rebalances and stats["eplb_move_seconds"] > 0
        assert all(v >= 1.0 for v in stats["eplb_imbalance"].values())
    finally:
        engine.close()

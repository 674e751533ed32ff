"""The second KV tier: blocks go down instead of being dropped and come back up unchanged, none lost or held
twice, swap or recompute as the cost model says, and the engine's output identical with the tier on."""

import errno
import os

import pytest
import torch

from shared.block_hash import block_hashes
from shared.cost_model import CostModel
from shared.engine.block_manager import BlockManager
from shared.engine.kv_tier import HostKvTier
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from tests.engine.helpers import greedy, make_engine, run_all
from tests.engine.test_block_manager import computed, seq_of
from tests.engine.test_engine import prompts, tokens

LAYERS, BLOCKS, BLOCK_SIZE = 2, 6, 4


def pool_with_tier(host_blocks: int, recompute_seconds=lambda start: None):
    """A block manager over a real KV pool whose every block holds distinct values, and its tier."""
    shape = (LAYERS, BLOCKS, BLOCK_SIZE, 1, 2)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    events = []
    bm = BlockManager(BLOCKS, BLOCK_SIZE, on_event=lambda *e: events.append(e))
    bm.tier = HostKvTier(host_blocks, k_cache, v_cache, recompute_seconds)
    return bm, k_cache, v_cache, events


def kv_of(k_cache, v_cache, block_ids):
    return [(k_cache[:, b].clone(), v_cache[:, b].clone()) for b in block_ids]


def flood(bm: BlockManager, first_token: int) -> None:
    """Fill the whole pool with another prompt's blocks, evicting every cached one, then let it go."""
    other = seq_of(list(range(first_token, first_token + BLOCKS * BLOCK_SIZE)))
    computed(bm, other)
    bm.free(other)


def assert_every_block_accounted(bm: BlockManager) -> None:
    """Each pool block is free, evictable or referenced, once; each tier slot is free or holds one hash."""
    held = {b.block_id for b in bm.blocks if b.ref_count > 0}
    free, evictable = list(bm.free_ids), list(bm.evictable)
    assert len(free) + len(evictable) + len(held) == bm.num_blocks
    assert len(set(free) | set(evictable) | held) == bm.num_blocks
    tier = bm.tier
    slots = list(tier.index.values())
    assert len(slots) == len(set(slots)) == len(tier.token_ids)
    assert len(slots) + len(tier.free_slots) == tier.num_blocks
    assert not set(slots) & set(tier.free_slots)


def test_an_evicted_prefix_comes_back_from_the_tier_unchanged():
    bm, k_cache, v_cache, events = pool_with_tier(host_blocks=8)
    prompt = list(range(100, 113))  # 3 full blocks and a token
    first = seq_of(prompt)
    computed(bm, first)
    original = kv_of(k_cache, v_cache, first.block_table[:3])
    bm.free(first)
    flood(bm, 500)
    hashes = block_hashes(prompt, BLOCK_SIZE)
    assert not set(hashes) & set(bm.hash_to_block) and all(bm.tier.holds(h) for h in hashes)
    assert ("stored", [hashes[0]], None, "host") in events and ("removed", [hashes[0]], None, "device") in events

    again = seq_of(prompt)
    bm.allocate_prefix(again)
    assert again.num_computed_tokens == 12 and again.num_cached_tokens == 12
    for (k, v), (k0, v0) in zip(kv_of(k_cache, v_cache, again.block_table), original):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert events[-1] == ("stored", [hashes[2]], hashes[1], "device")
    assert bm.tier.swapped_in == 3
    assert_every_block_accounted(bm)


def test_the_tier_drops_its_least_recently_used_blocks_and_checks_tokens():
    bm, _, _, events = pool_with_tier(host_blocks=2)
    prompt = list(range(100, 113))
    first = seq_of(prompt)
    computed(bm, first)
    bm.free(first)  # its tail block is evicted first, so it goes down first and is the first dropped
    flood(bm, 500)
    hashes = block_hashes(prompt, BLOCK_SIZE)
    assert [bm.tier.holds(h) for h in hashes] == [True, True, False]
    assert ("removed", [hashes[2]], None, "host") in events
    again = seq_of(prompt)
    bm.allocate_prefix(again)  # what goes down to make room for them does not push them out
    assert again.num_computed_tokens == 8 and bm.tier.holds(hashes[0]) and bm.tier.holds(hashes[1])
    bm.free(again)
    slot = bm.tier.index[hashes[1]]
    bm.tier.token_ids[slot] = [9, 9, 9, 9]  # as if another block had collided into this hash
    assert not bm.tier.load(hashes[1], prompt[4:8], 0)
    assert_every_block_accounted(bm)


@pytest.mark.parametrize("recompute", [0.0, 10.0])
def test_blocks_go_down_only_when_that_is_cheaper_than_recomputing_them(recompute):
    bm, *_ = pool_with_tier(host_blocks=8, recompute_seconds=lambda start: recompute)
    first = seq_of(list(range(100, 113)))
    computed(bm, first)
    bm.free(first)
    flood(bm, 500)
    tier = bm.tier
    if recompute == 0.0:  # recomputing costs nothing: nothing is copied
        assert tier.swapped_out == 0 and tier.recomputed == 3 and not tier.index
    else:
        assert tier.swapped_out == 3 and tier.recomputed == 0
    assert_every_block_accounted(bm)


# ---- in the engine -----------------------------------------------------------------------------------
def test_a_tier_the_disk_cannot_hold_is_refused_at_start_and_leaves_no_file(tmp_path, monkeypatch):
    def disk_full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    k_cache = torch.zeros(2, 4, 4, 1, 8)
    with pytest.raises(OSError, match=r"--kv-host-memory: cannot reserve 2048 bytes .* No space left on device"):
        HostKvTier(4, k_cache, k_cache.clone(), directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("llama")))


def with_tier(ckpt, kv_blocks: int, host_blocks: int, recompute_seconds: float = 1.0, **overrides):
    """An engine with a tier, told that recomputing a block costs `recompute_seconds` (on a model this tiny it
    costs less than the copies, so its own cost model would recompute)."""
    block_bytes = ModelRunner.block_bytes(ckpt.config, 16, torch.float32)
    engine = make_engine(ckpt, kv_blocks=kv_blocks, kv_host_memory=host_blocks * block_bytes, **overrides)
    engine.block_manager.tier.recompute_seconds = lambda start: recompute_seconds
    return engine


def test_prefix_hits_from_the_tier_give_the_same_greedy_output(ckpt):
    shared = prompts(1, lengths=(70,))[0]
    reqs = {f"r{i}": (shared + p, greedy(12)) for i, p in enumerate(prompts(6, lengths=(9, 20, 5)))}
    roomy = tokens(run_all(make_engine(ckpt), reqs))
    engine = with_tier(ckpt, kv_blocks=12, host_blocks=64)
    out = {}
    for i, (rid, req) in enumerate(reqs.items()):  # one at a time, each after a prompt that evicts the prefix
        out |= tokens(run_all(engine, {rid: req}))
        run_all(engine, {f"flood-{rid}": (prompts(1, lengths=(178,), seed=i + 1)[0], greedy(2))})
    assert out == roomy
    stats = engine.stats()
    assert stats["kv_swapped_in_blocks"] >= 4 * (len(reqs) - 1)
    assert stats["free_blocks"] == stats["total_blocks"]
    assert_every_block_accounted(engine.block_manager)


def test_preempted_sequences_come_back_from_the_tier_with_the_same_output(ckpt):
    reqs = {f"r{i}": (p, greedy(40)) for i, p in enumerate(prompts(6, lengths=(40, 50, 45)))}
    roomy = tokens(run_all(make_engine(ckpt), reqs))
    tight = with_tier(ckpt, kv_blocks=14, host_blocks=64)
    assert tokens(run_all(tight, reqs)) == roomy
    stats = tight.stats()
    assert stats["preemptions"] > 0 and stats["kv_swapped_in_blocks"] > 0
    assert stats["free_blocks"] == stats["total_blocks"]
    assert_every_block_accounted(tight.block_manager)


@pytest.mark.parametrize("token_seconds", [0.0, 1.0])
def test_the_engine_swaps_or_recomputes_as_its_cost_model_says(ckpt, token_seconds):
    reqs = {f"r{i}": (p, greedy(40)) for i, p in enumerate(prompts(6, lengths=(40, 50, 45)))}
    tight = make_engine(ckpt, kv_blocks=14, kv_host_memory=1 << 24)
    tight.costs.model = CostModel(token=token_seconds)  # a block costs 16 x this to recompute
    tight.costs.observe = lambda sample: None  # and keeps costing it: no refit from the steps measured
    run_all(tight, reqs)
    stats = tight.stats()
    if token_seconds:
        assert stats["kv_swapped_out_blocks"] > 0 and stats["kv_recomputed_blocks"] == 0
    else:
        assert stats["kv_swapped_out_blocks"] == 0 and stats["kv_recomputed_blocks"] > 0


def test_the_tier_needs_prefix_caching(ckpt):
    with pytest.raises(ValueError, match="prefix caching"):
        with_tier(ckpt, kv_blocks=14, host_blocks=4, enable_prefix_caching=False)

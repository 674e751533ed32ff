"""Block manager: ref counts, prefix cache on chained hashes, LRU eviction, KV events."""

from shared.block_hash import block_hashes, hash_block
from shared.engine.block_manager import BlockManager
from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import Sequence


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def computed(bm: BlockManager, seq: Sequence) -> None:
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, 4)
    seq = seq_of(list(range(10)))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_allocate_refuses_when_blocks_run_out_and_takes_nothing():
    bm = BlockManager(2, 4)
    seq = seq_of(list(range(12)))
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_but_never_the_last_token():
    events = []
    bm = BlockManager(16, 4, on_event=lambda *e: events.append(e))
    first = seq_of(list(range(10)))
    computed(bm, first)
    assert events == [("stored", block_hashes(list(range(10)), 4), None, "device")]
    second = seq_of(list(range(8)) + [99, 98, 97])
    bm.allocate_prefix(second)
    assert second.block_table == first.block_table[:2]
    assert second.num_computed_tokens == 8 == second.num_cached_tokens
    # a prompt that is entirely cached still computes its last block's tokens
    third = seq_of(list(range(8)))
    bm.allocate_prefix(third)
    assert third.num_computed_tokens == 4
    for seq in (second, third, third):  # admitted; the third twice (as a preempted sequence is, coming back)
        bm.count_lookup(seq)
    assert (bm.prefix_queries, bm.prefix_hits) == (2 + 1, 2 + 1)  # every full prompt block but the last token's


def test_hash_collision_is_checked_against_stored_tokens():
    bm = BlockManager(8, 4)
    first = seq_of([1, 2, 3, 4, 5])
    computed(bm, first)
    block = bm.blocks[first.block_table[0]]
    block.token_ids = [9, 9, 9, 9]  # as if another prefix had collided into this hash
    other = seq_of([1, 2, 3, 4, 5])
    bm.allocate_prefix(other)
    assert other.block_table == [] and other.num_computed_tokens == 0


def test_freed_cached_blocks_stay_findable_until_evicted_lru():
    events = []
    bm = BlockManager(4, 2, on_event=lambda *e: events.append(e))
    a = seq_of([1, 2, 3, 4, 5])
    computed(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = seq_of([1, 2, 3, 4, 5])
    bm.allocate_prefix(again)
    assert again.num_computed_tokens == 4
    bm.free(again)
    # fill the cache with other tokens: the cached blocks get evicted, tail block first
    big = seq_of(list(range(100, 108)))
    assert bm.allocate(big, 8)
    removed = [e for e in events if e[0] == "removed"]
    hashes = block_hashes([1, 2, 3, 4], 2)
    assert [r[1][0] for r in removed] == [hashes[1], hashes[0]]
    probe = seq_of([1, 2, 3, 4, 5])
    bm.allocate_prefix(probe)
    assert probe.num_computed_tokens == 0


def test_fork_shares_full_blocks_and_gives_a_fresh_partial_block():
    bm = BlockManager(8, 4)
    parent = seq_of(list(range(10)))
    computed(bm, parent)
    child = seq_of(list(range(10)))
    partial = bm.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2]
    assert partial == child.block_table[2] != parent.block_table[2]
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_each_full_block_is_hashed_once_and_a_growing_sequence_stores_only_new_blocks(monkeypatch):
    import shared.engine.block_manager as block_manager

    calls = []
    monkeypatch.setattr(block_manager, "hash_block", lambda *a: calls.append(a) or hash_block(*a))
    events = []
    bm = BlockManager(16, 4, on_event=lambda *e: events.append(e))
    twin_a, twin_b = seq_of(list(range(9))), seq_of(list(range(9)))
    for seq in (twin_a, twin_b):  # two equal prompts computed in the same step
        computed(bm, seq)
    assert len(calls) == 4  # 2 full blocks each; twin_b's are duplicates, kept out of the cache
    for seq in (twin_a, twin_b):
        bm.cache_full_blocks(seq)  # the next step: nothing new, nothing re-hashed
    assert len(calls) == 4
    twin_a.token_ids += [20, 21, 22]  # it decodes on and fills its third block
    computed(bm, twin_a)
    assert len(calls) == 5
    hashes = block_hashes(list(range(9)) + [20, 21, 22], 4)
    assert events == [("stored", hashes[:2], None, "device"), ("stored", hashes[2:], hashes[1], "device")]

"""Engine invariants on a tiny random Llama: batching, chunking, prefix caching, preemption, abort, n."""

import random

import pytest
import torch

from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from tests.engine.helpers import greedy, make_engine, run_all


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("llama")))


def prompts(n: int, lengths=(5, 17, 33, 48, 9, 64), seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 1000) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def tokens(results: dict) -> dict:
    return {rid: [r[0] for _, r in sorted(seqs.items())] for rid, seqs in results.items()}


def test_batched_equals_single(ckpt):
    ps = prompts(6)
    alone = {}
    for i, p in enumerate(ps):
        alone.update(tokens(run_all(make_engine(ckpt), {f"r{i}": (p, greedy(20))})))
    together = tokens(run_all(make_engine(ckpt), {f"r{i}": (p, greedy(20)) for i, p in enumerate(ps)}))
    assert together == alone
    assert all(len(t[0]) == 20 for t in alone.values())


def test_chunked_prefill_equals_unchunked(ckpt):
    reqs = {f"r{i}": (p, greedy(12)) for i, p in enumerate(prompts(4, lengths=(70, 45, 31, 90)))}
    whole = tokens(run_all(make_engine(ckpt), reqs))
    chunked_engine = make_engine(ckpt, max_num_batched_tokens=16)
    assert tokens(run_all(chunked_engine, reqs)) == whole


def test_prefix_cache_hit_equals_miss(ckpt):
    shared = prompts(1, lengths=(64,))[0]
    reqs = {"a": (shared + [5, 6, 7], greedy(10)), "b": (shared + [8, 9], greedy(10))}
    no_cache = tokens(run_all(make_engine(ckpt, enable_prefix_caching=False), reqs))
    engine = make_engine(ckpt)
    first = tokens(run_all(engine, {"a": reqs["a"]}))
    engine.add_request("b", *reqs["b"])
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].cached_tokens == 64
    second = {"b": [[t for o in outs for t in o.outputs[0].token_ids]]}
    assert {**first, **second} == no_cache
    assert engine.block_manager.prefix_hits >= 4


def test_preempted_and_recomputed_equals_uninterrupted(ckpt):
    reqs = {f"r{i}": (p, greedy(40)) for i, p in enumerate(prompts(6, lengths=(20, 30, 25)))}
    roomy = tokens(run_all(make_engine(ckpt), reqs))
    tight = make_engine(ckpt, kv_blocks=12)
    assert tokens(run_all(tight, reqs)) == roomy
    assert tight.scheduler.num_preemptions > 0


def test_abort_frees_every_block_at_once(ckpt):
    engine = make_engine(ckpt)
    total = engine.block_manager.num_free_blocks
    for i, p in enumerate(prompts(5)):
        engine.add_request(f"r{i}", p, greedy(50))
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_blocks < total
    for i in range(5):
        assert engine.abort_request(f"r{i}")
    assert engine.block_manager.num_free_blocks == total
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_work()
    assert not engine.abort_request("r0")


def test_online_request_passes_queued_offline_ones(ckpt):
    engine = make_engine(ckpt, max_num_seqs=1)
    for i, p in enumerate(prompts(3)):
        engine.add_request(f"offline{i}", p, greedy(3), priority=1)
    engine.add_request("online", prompts(1)[0], greedy(3), priority=0)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished[0] == "online"


def test_n_greater_than_one_shares_the_prompt_blocks(ckpt):
    engine = make_engine(ckpt)
    prompt = prompts(1, lengths=(40,))[0]
    res = run_all(
        engine,
        {
            "g": (prompt, greedy(8, n=3)),
            "s": (prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)),
        },
    )
    assert sorted(res["g"]) == [0, 1, 2]
    assert res["g"][0][0] == res["g"][1][0] == res["g"][2][0]  # greedy siblings agree
    sampled = [res["s"][i][0] for i in range(4)]
    assert len({tuple(t) for t in sampled}) > 1  # independent samples
    single = tokens(run_all(make_engine(ckpt), {"x": (prompt, greedy(8))}))["x"][0]
    assert res["g"][0][0] == single
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def hand_off(src, dst, rid: str, prompt: list[int], params: SamplingParams) -> dict:
    """Prefill `rid` on `src`, copy its KV into `dst`, decode there; per index (token_ids, text, reason)
    across both engines, as run_all returns them."""
    results: dict[int, tuple] = {}

    def collect(outs):
        for out in outs:
            for d in out.outputs:
                ids, text, _ = results.get(d.index, ([], "", None))
                results[d.index] = (ids + d.token_ids, text + d.text, d.finish_reason)

    src.handoff.add_prefill_request(rid, prompt, params)
    outs = []
    while src.has_unfinished_requests():
        outs += src.step()
    collect(outs)
    assert len(outs) == 1  # every sequence samples its first token in the same step
    if outs[0].finished:
        assert rid not in src.handoff.held
        return results
    assert outs[0].held
    blocks, n = src.handoff.held_blocks(rid)
    assert n == len(prompt)
    target = dst.handoff.reserve_import(rid, prompt, params)
    for layer in range(src.model_config.num_hidden_layers):
        dst.runner.write_blocks(target, layer, *src.runner.read_blocks(blocks, layer))
    continuations = src.handoff.continuations(rid)
    src.handoff.release_held(rid)
    dst.handoff.commit_import(rid, continuations)
    while dst.has_unfinished_requests():
        collect(dst.step())
    return results


def test_prefill_samples_the_first_token_and_decode_goes_on_like_one_engine(ckpt):
    prompt = prompts(1, lengths=(40,))[0]
    want = run_all(make_engine(ckpt), {"x": (prompt, greedy(12))})["x"]
    src, dst = make_engine(ckpt), make_engine(ckpt)
    assert hand_off(src, dst, "x", prompt, greedy(12)) == want
    for engine in (src, dst):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_n_sequences_through_a_hand_off_equal_one_engine(ckpt):
    """Each sequence's first token, sampler state and stop strings carry over; siblings fork on decode."""
    prompt = prompts(1, lengths=(37,))[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, n=3, seed=7, stop=["zz"], ignore_eos=True)
    want = run_all(make_engine(ckpt), {"s": (prompt, params)})["s"]
    got = hand_off(make_engine(ckpt), make_engine(ckpt), "s", prompt, params)
    assert got == want
    assert len({tuple(v[0]) for v in want.values()}) > 1  # the siblings differ: the seeds matter


def test_a_request_done_at_its_first_token_is_not_held(ckpt):
    src, dst = make_engine(ckpt), make_engine(ckpt)
    got = hand_off(src, dst, "one", prompts(1, lengths=(20,))[0], greedy(1))
    assert len(got[0][0]) == 1 and got[0][2] == "length"
    assert src.block_manager.num_free_blocks == src.block_manager.num_blocks


def test_prefill_on_a_cached_prefix_computes_only_the_rest(ckpt):
    engine = make_engine(ckpt)
    prompt = prompts(1, lengths=(17,))[0]
    run_all(engine, {"warm": (prompt, greedy(2))})  # caches the first block
    engine.handoff.add_prefill_request("p", prompt, greedy(4))
    (out,) = engine.step()
    assert out.held and out.cached_tokens == 16 and len(out.outputs[0].token_ids) == 1
    blocks, tokens_held = engine.handoff.held_blocks("p")
    assert tokens_held == 17 and len(blocks) == 2
    assert not engine.has_unfinished_requests()
    engine.abort_request("p")  # an abort frees a held request too
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_kv_sink_gets_every_layer_during_the_prompt_s_last_step_only(ckpt):
    """A prompt chunked over 2 steps after a prefix-cache hit: the sink sees each layer once, in order,
    in the last step, with the blocks of the whole prompt (the cached one too) holding that layer's KV."""
    engine = make_engine(ckpt, max_num_batched_tokens=16)
    prompt = prompts(1, lengths=(40,))[0]
    run_all(engine, {"warm": (prompt[:20], greedy(1))})  # the first block comes from the prefix cache
    calls, copies = [], {}

    def sink(runner, layer: int, block_ids: list[int]) -> None:
        calls.append((steps, layer))
        copies[layer] = engine.runner.read_blocks(list(block_ids), layer)

    engine.handoff.add_prefill_request("p", prompt, greedy(4), kv_sink=sink)
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        engine.step()
    layers = ckpt.config.num_hidden_layers
    assert calls == [(steps, i) for i in range(layers)] and steps == 2  # 16 cached + 16 + 8 tokens
    blocks, _ = engine.handoff.held_blocks("p")
    for layer in range(layers):
        k, v = engine.runner.read_blocks(blocks, layer)
        assert torch.equal(copies[layer][0], k) and torch.equal(copies[layer][1], v)


def test_commit_import_refuses_continuations_that_do_not_fit_and_frees_the_blocks(ckpt):
    from shared.engine.errors import InvalidRequestError
    from shared.engine.kv_handoff import Continuation

    engine = make_engine(ckpt)
    prompt = prompts(1, lengths=(20,))[0]
    seeded = SamplingParams(temperature=1.0, max_tokens=4, n=2, seed=3)
    good_state = torch.Generator().manual_seed(0).get_state().numpy().tobytes()
    for bad in (
        [Continuation(2, 5, good_state)],  # index outside n
        [Continuation(0, 5, good_state), Continuation(0, 6, good_state)],  # twice the same
        [Continuation(0, 10**9, good_state)],  # outside the vocabulary
        [Continuation(0, 5, b"\0" * 16)],
    ):  # another device type's sampler state
        assert engine.handoff.reserve_import("x", prompt, seeded) is not None
        with pytest.raises(InvalidRequestError):
            engine.handoff.commit_import("x", bad)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.handoff.reserve_import("x", prompt, seeded) is not None
    engine.handoff.commit_import("x", [Continuation(1, 5, good_state)])  # index 0 finished on the prefill side
    assert not engine.handoff.importing and len(engine.requests["x"].seqs) == 1

"""The engine's self-measurement: both kinds of step in its fit before it serves, and nothing left behind."""

import pytest

from shared.engine.calibrate import calibrate
from shared.engine.loader import load_checkpoint
from tests.engine.helpers import greedy, make_engine, run_all


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir):
    return load_checkpoint(str(tiny_model_dir("llama")))


def test_calibration_covers_prompts_and_decode_batches_and_leaves_the_engine_as_it_was(ckpt):
    engine = make_engine(ckpt, max_num_seqs=4)
    samples = calibrate(engine)
    assert any(s.tokens > s.seqs for s in samples)  # prompt chunks
    assert any(s.seqs == s.tokens == 4 for s in samples)  # a decode batch, capped by max_num_seqs
    assert engine.costs.model is not None and engine.costs.prior == samples and not engine.costs.recent
    bm = engine.block_manager
    assert bm.enable_prefix_caching and bm.num_free_blocks == bm.num_blocks and bm.prefix_queries == 0
    assert not engine.has_unfinished_requests() and not bm.hash_to_block  # nothing cached from random prompts
    prompt = list(range(10, 50))
    assert run_all(engine, {"a": (prompt, greedy(8))}) == run_all(make_engine(ckpt), {"a": (prompt, greedy(8))})

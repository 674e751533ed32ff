"""Scheduler decisions that need no model: admission when blocks run out."""

from shared.engine.block_manager import BlockManager
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Sequence, SequenceStatus


def setup() -> tuple[Scheduler, Sequence]:
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    running = Sequence("running", list(range(12)), SamplingParams())
    assert bm.allocate(running, 12)  # 3 of the 4 blocks
    running.num_computed_tokens = 11
    scheduler.start(running)
    waiting = Sequence("imported", list(range(8)), SamplingParams())
    assert bm.allocate(waiting, 4)  # the last block holds KV imported for 4 prompt tokens
    waiting.num_computed_tokens = 4
    return scheduler, waiting


def test_imported_kv_is_kept_while_others_run():
    scheduler, waiting = setup()
    scheduler.imported = {waiting}.__contains__
    scheduler.add(waiting)
    scheduler.schedule()  # no block for its remaining tokens yet
    assert waiting.status == SequenceStatus.WAITING
    assert len(waiting.block_table) == 1 and waiting.num_computed_tokens == 4


def test_other_waiting_sequences_release_their_blocks():
    scheduler, waiting = setup()
    scheduler.add(waiting)
    scheduler.schedule()
    assert waiting.block_table == [] and waiting.num_computed_tokens == 0

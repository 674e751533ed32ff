"""Scheduler decisions that need no model: admission when blocks run out, online work before offline work."""

from shared.cost_model import CostModel
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


# --- online and offline work on one engine ----------------------------------------------------------

COST = CostModel(step=0.010, seq=0.001, token=0.0, attention=0.0, context=0.0)  # 10 ms a step, 1 ms a sequence


def decoding(rid: str, bm: BlockManager, priority: int, arrival: float) -> Sequence:
    """A running sequence about to decode its next token (8 tokens held)."""
    seq = Sequence(rid, list(range(9)), SamplingParams(), priority=priority, arrival=arrival)
    assert bm.allocate(seq, 9)
    seq.num_computed_tokens = 8
    return seq


def colocated(num_blocks: int = 64, max_num_seqs: int = 8, model: CostModel | None = COST) -> Scheduler:
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=64, step_cost=lambda: model)


def test_an_online_arrival_takes_the_place_of_the_latest_offline_sequence():
    scheduler = colocated(max_num_seqs=2)
    first, latest = (decoding(f"job-{i}", scheduler.block_manager, 1, arrival=i) for i in range(2))
    for seq in (first, latest):
        scheduler.start(seq)
    online = Sequence("chat", list(range(6)), SamplingParams(), priority=0, arrival=5)
    scheduler.add(online)
    ran = {s.seq.request_id for s in scheduler.schedule()}
    assert "chat" in ran and latest.status == SequenceStatus.WAITING and latest.block_table == []
    assert scheduler.num_offline_preemptions == 1 and list(scheduler.waiting) == [latest]  # it resumes later


def test_an_online_arrival_frees_blocks_held_by_offline_sequences():
    scheduler = colocated(num_blocks=6)  # two offline sequences hold 3 blocks each
    offline = [decoding(f"job-{i}", scheduler.block_manager, 1, arrival=i) for i in range(2)]
    for seq in offline:
        scheduler.start(seq)
    scheduler.add(Sequence("chat", list(range(10)), SamplingParams(), priority=0, arrival=5))  # needs 3 blocks
    assert "chat" in {s.seq.request_id for s in scheduler.schedule()}
    assert offline[1].status == SequenceStatus.WAITING and offline[0].status == SequenceStatus.RUNNING


def test_beside_online_work_offline_sequences_may_slow_the_step_by_a_tenth():
    scheduler = colocated()
    scheduler.start(decoding("chat", scheduler.block_manager, 0, arrival=0))
    for i in range(5):
        scheduler.start(decoding(f"job-{i}", scheduler.block_manager, 1, arrival=1 + i))
    ran = [s.seq.request_id for s in scheduler.schedule()]
    assert ran == ["chat", "job-0"]  # 11 ms online; each offline decode adds 1 ms: one fits in 1.1 ms
    assert all(seq.status == SequenceStatus.RUNNING for seq in scheduler.running)  # held back, not preempted


def test_offline_sequences_take_the_whole_step_without_online_work_or_a_cost_model():
    alone = colocated()
    for i in range(5):
        alone.start(decoding(f"job-{i}", alone.block_manager, 1, arrival=i))
    assert len(alone.schedule()) == 5
    unmeasured = colocated(model=None)
    unmeasured.start(decoding("chat", unmeasured.block_manager, 0, arrival=0))
    for i in range(5):
        unmeasured.start(decoding(f"job-{i}", unmeasured.block_manager, 1, arrival=1 + i))
    assert len(unmeasured.schedule()) == 6


def test_alone_offline_work_makes_short_steps_so_an_online_arrival_soon_takes_its_place():
    model = CostModel(step=0.010, seq=0.0, token=0.001, attention=0.0, context=0.0)  # 1 ms a token
    scheduler = colocated(model=model)
    scheduler.offline_step_s = 0.05
    scheduler.add(Sequence("job", list(range(200)), SamplingParams(), priority=1))
    (chunk,) = scheduler.schedule()
    assert chunk.num_new_tokens == 40  # 10 ms + 40 x 1 ms = the 50 ms a step may take (the budget is 64)
    other = colocated(model=model)  # not even one token fits: an empty step still takes one
    other.offline_step_s = 0.001
    other.add(Sequence("job", list(range(200)), SamplingParams(), priority=1))
    assert [s.num_new_tokens for s in other.schedule()] == [1]

"""The token budget under a TPOT target follows the step-cost model (shared/engine/step_budget.py), and the
scheduler takes it; without a target nothing changes."""

from shared.cost_model import CostModel
from shared.engine.block_manager import BlockManager
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Sequence
from shared.engine.step_budget import decoding, prefill_room, token_budget

CHEAP = CostModel(step=0.005, seq=0.0005, token=0.0001, attention=1e-8, context=1e-6)
COSTLY = CostModel(step=0.005, seq=0.0005, token=0.0004, attention=4e-8, context=1e-6)


def decodes(n: int, held: int = 100) -> list[Sequence]:
    seqs = []
    for i in range(n):
        seq = Sequence(f"d{i}", list(range(held + 1)), SamplingParams())
        seq.num_computed_tokens = held
        seqs.append(seq)
    return seqs


def test_decoding_counts_decodes_and_their_context_not_prompts():
    prompt = Sequence("p", list(range(50)), SamplingParams())
    assert decoding([*decodes(3, held=100), prompt]) == (3, 303)


def test_the_budget_fits_the_target_and_the_next_token_would_not():
    running = decodes(8)
    budget = token_budget(CHEAP, running, 0.1, floor=16, ceiling=4096)
    n = budget - 8
    assert CHEAP.step_seconds(9, 8 + n, n * n, 808) <= 0.1 < CHEAP.step_seconds(9, 9 + n, (n + 1) ** 2, 808)


def test_a_costlier_model_gives_a_smaller_budget():
    running = decodes(8)
    cheap, costly = (token_budget(m, running, 0.1, floor=16, ceiling=4096) for m in (CHEAP, COSTLY))
    assert 16 < costly < cheap < 4096


def test_more_decodes_leave_less_room_for_prompts():
    assert prefill_room(CHEAP, 32, 32 * 500, 0.1, 4096) < prefill_room(CHEAP, 4, 4 * 500, 0.1, 4096)


def test_the_budget_stays_between_the_floor_and_the_ceiling():
    running = decodes(8)
    assert token_budget(CHEAP, running, 0.1, floor=16, ceiling=256) == 256  # the model allows more
    assert token_budget(COSTLY, running, 0.001, floor=48, ceiling=4096) == 48  # nothing fits: the floor
    assert token_budget(COSTLY, decodes(60), 0.001, floor=48, ceiling=4096) == 60  # every decode keeps its token


def test_without_a_target_or_a_model_the_configured_budget_holds():
    running = decodes(8)
    assert token_budget(COSTLY, running, None, floor=16, ceiling=2048) == 2048
    assert token_budget(None, running, 0.05, floor=16, ceiling=2048) == 2048


def scheduled_tokens(model: CostModel | None, target_s: float | None) -> tuple[int, int]:
    bm = BlockManager(256, 16, enable_prefix_caching=False)
    scheduler = Scheduler(bm, 16, 2048, step_cost=lambda: model, step_target_s=target_s, min_num_batched_tokens=32)
    for seq in decodes(4):
        assert bm.allocate(seq, seq.num_tokens)
        scheduler.start(seq)
    scheduler.add(Sequence("prompt", list(range(1500)), SamplingParams()))
    batch = scheduler.schedule()
    return sum(s.num_new_tokens for s in batch), scheduler.last_budget


def test_the_scheduler_chunks_a_prompt_to_the_adapted_budget():
    tokens, budget = scheduled_tokens(COSTLY, 0.05)
    assert tokens == budget == token_budget(COSTLY, decodes(4), 0.05, 32, 2048) < 1504
    assert scheduled_tokens(CHEAP, 0.05)[0] > tokens  # cheaper steps: a bigger chunk


def test_the_scheduler_without_a_target_schedules_as_before():
    assert scheduled_tokens(COSTLY, None) == (1504, 2048)


def test_an_engine_under_a_target_chunks_prompts_to_its_cost_model_and_generates_the_same(tiny_model_dir):
    from shared.engine.config import EngineConfig
    from shared.engine.llm_engine import LLMEngine
    from shared.engine.loader import load_checkpoint

    ckpt = load_checkpoint(str(tiny_model_dir("llama")))
    prompts = [[(7 * i + j) % 200 + 5 for j in range(150)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6, ignore_eos=True)
    outputs, budgets = [], []
    for target_ms in (None, 30.0):
        config = EngineConfig(num_threads=1, kv_cache_memory=8 << 20, step_slo_ms=target_ms, min_num_batched_tokens=16)
        engine = LLMEngine(config, ckpt)
        engine.costs.model = COSTLY  # prompt tokens priced high: 30 ms leaves room for a few dozen beside decodes
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        tokens, seen = {}, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            seen.append(engine.scheduler.last_budget)
        outputs.append(tokens)
        budgets.append(seen)
    assert set(budgets[0]) == {2048}
    assert max(budgets[1]) < 2048 and min(budgets[1]) >= 16
    assert outputs[0] == outputs[1]

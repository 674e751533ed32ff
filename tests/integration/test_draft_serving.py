"""`xllm up --speculative draft --draft-model M` end to end: the decode worker drafts with a second model that
shares the target's tokenizer (SmolLM2 cut to 4 of its 30 layers, the only such model offline), and greedy
output through the gateway is the in-process engine's without speculation."""

import asyncio

import aiohttp
import pytest

from benchmarks.truncated_draft import write_truncated
from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.sampling_params import SamplingParams
from tests.conftest import SMALL_SYSTEM
from tests.integration.test_serving import QUESTIONS, chat
from tests.waiting import until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def drafting_system(tmp_path_factory: pytest.TempPathFactory):
    from xllm.bench.local_system import start_system, stop_system

    draft = write_truncated("smollm2", [0, 1, 28, 29], tmp_path_factory.mktemp("draft") / "smollm2-4-layers")
    argv = ("--speculative", "draft", "--draft-model", str(draft), "--draft-length", "fixed")
    system = start_system(tmp_path_factory.mktemp("xllm-draft"), *SMALL_SYSTEM, *argv)
    try:
        yield system
    finally:
        stop_system(system.proc)


async def test_greedy_output_with_a_draft_model_is_the_engines_without_one(drafting_system):
    def drafted() -> int:
        counters = next(i["counters"] for i in drafting_system.instances() if i["role"] == "decode")
        return counters.get("spec_drafted_tokens", 0)

    before = drafted()
    params = SamplingParams(temperature=0, max_tokens=40)
    local = LLM(EngineConfig(model="smollm2", kv_cache_memory=128 << 20, num_threads=1))  # no speculation
    expected = local.generate(QUESTIONS, params, chat=True)
    async with aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(chat(s, drafting_system.url, q, temperature=0, max_tokens=40) for q in QUESTIONS))
    for want, resp in zip(expected, got):
        assert resp["choices"][0]["message"]["content"] == want.outputs[0].text
        assert resp["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)
    await until(lambda: drafted() > before, 30, "the decode worker's heartbeat never showed draft tokens scored")

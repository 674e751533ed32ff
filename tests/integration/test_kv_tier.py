"""The second KV tier through `xllm up`: a worker whose KV pool is far smaller than its prompts sends evicted
prefix blocks down (its own cost model says copying beats recomputing SmolLM2's blocks), the kvcache index
learns they are on the "host" tier, and the prompt sent again is served from there with the same output."""

import random

import aiohttp
import pytest

from shared import subjects
from shared.bus import connect, request
from shared.messages import KvQuery, KvQueryReply
from tests.waiting import until

pytestmark = pytest.mark.integration

BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M, fp32: layers x (K, V) x block x KV heads x head dim x 4


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    from xllm.bench.local_system import start_system, stop_system

    system = start_system(
        tmp_path_factory.mktemp("xllm-tier"),
        *("--mode", "colocated", "--decode", "1", "--worker-threads", "1", "--max-num-seqs", "4"),
        *("--kv-cache-memory", str(48 * BLOCK_BYTES), "--kv-host-memory", str(256 * BLOCK_BYTES)),
    )
    try:
        yield system
    finally:
        stop_system(system.proc)


async def complete(session, url: str, prompt: list[int]) -> dict:
    payload = {"model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    async with session.post(f"{url}/v1/completions", json=payload) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_evicted_prefix_blocks_are_served_again_from_the_second_tier(tiered):
    rng = random.Random(0)
    prompt = [rng.randrange(100, 40000) for _ in range(300)]  # 18 full blocks
    floods = [[rng.randrange(100, 40000) for _ in range(600)] for _ in range(3)]  # 38 blocks each, of a pool of 48
    async with aiohttp.ClientSession() as session:
        first = await complete(session, tiered.url, prompt)
        for flood in floods:
            await complete(session, tiered.url, flood)
        nc = await connect(tiered.nats_url, "test-kv-tier")
        try:

            async def on_host() -> bool:
                reply = await request(nc, subjects.KVCACHE_QUERY, KvQuery("q", prompt, 16), KvQueryReply, timeout=5)
                return any(tiers.get("host", 0) >= 17 for tiers in reply.tiers.values())

            await until(on_host, 30, "the index never learned that the prompt's blocks went down a tier")
        finally:
            await nc.close()
        again = await complete(session, tiered.url, prompt)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 17 * 16
    await until(
        lambda: tiered.instances()[0]["counters"].get("kv_swapped_in_blocks", 0) >= 17,
        30,
        "the worker never reported the blocks it brought back up",
    )

"""The whole system through HTTP: `xllm up` (disaggregated prefill -> decode), real SmolLM2."""

import asyncio
import json

import aiohttp
import pytest

from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.sampling_params import SamplingParams
from tests.waiting import until

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
]


@pytest.fixture(scope="module")
def local_llm():
    return LLM(EngineConfig(model="smollm2", kv_cache_memory=128 << 20, num_threads=1))


async def chat(session, url: str, content: str, **body) -> dict:
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": content}], **body}
    async with session.post(f"{url}/v1/chat/completions", json=payload) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def stream_chat(session, url: str, content: str, **body) -> tuple[str, dict | None, str | None]:
    payload = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    text, usage, finish = "", None, None
    async with session.post(f"{url}/v1/chat/completions", json=payload) as r:
        assert r.status == 200
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, usage, finish


async def test_disaggregated_greedy_equals_in_process_engine(xllm_system, local_llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    expected = local_llm.generate(QUESTIONS, params, chat=True)
    async with aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(chat(s, xllm_system.url, q, temperature=0, max_tokens=40) for q in QUESTIONS))
    for want, resp in zip(expected, got):
        assert resp["choices"][0]["message"]["content"] == want.outputs[0].text
        assert resp["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
        assert resp["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)


async def test_seeded_sampling_across_the_hand_off_equals_in_process_engine(xllm_system, local_llm):
    """The first tokens come from the prefill worker; the seeded sampler's state goes on on decode."""
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, n=2, seed=11)
    (want,) = local_llm.generate([QUESTIONS[3]], params, chat=True)
    async with aiohttp.ClientSession() as s:
        got = await chat(s, xllm_system.url, QUESTIONS[3], temperature=1.0, top_p=0.95, max_tokens=12, n=2, seed=11)
    assert [c["message"]["content"] for c in got["choices"]] == [o.text for o in want.outputs]


async def test_the_speculating_decode_worker_drafts_and_output_is_unchanged(xllm_system, local_llm):
    """The test system's decode worker speculates (n-gram, every draft scored): an answer that copies
    its prompt is drafted from it, and the output is the in-process engine's without speculation."""
    code = (
        "def area(width, height):\n    return width * height\n\ndef perimeter(width, height):\n"
        "    return 2 * (width + height)\n"
    )
    question = f"Repeat this code exactly:\n```python\n{code}```"
    (want,) = local_llm.generate([question], SamplingParams(temperature=0, max_tokens=60), chat=True)

    def decode_counters() -> dict:
        return next(i["counters"] for i in xllm_system.instances() if i["role"] == "decode")

    before = decode_counters().get("spec_accepted_tokens", 0)
    async with aiohttp.ClientSession() as s:
        got = await chat(s, xllm_system.url, question, temperature=0, max_tokens=60)
    assert got["choices"][0]["message"]["content"] == want.outputs[0].text
    await until(
        lambda: decode_counters()["spec_accepted_tokens"] >= before + 10,
        30,
        "the decode worker's heartbeat never showed accepted draft tokens",
    )


async def test_streaming_equals_non_streaming(xllm_system):
    async with aiohttp.ClientSession() as s:
        whole = await chat(s, xllm_system.url, QUESTIONS[1], temperature=0, max_tokens=30)
        text, usage, finish = await stream_chat(s, xllm_system.url, QUESTIONS[1], temperature=0, max_tokens=30)
    assert text == whole["choices"][0]["message"]["content"]
    # Cached tokens say which instance took each request (the router chooses per request), not how it streamed.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: usage[k] for k in counts} == {k: whole["usage"][k] for k in counts}
    assert finish == whole["choices"][0]["finish_reason"]


async def test_concurrent_requests_each_equal_their_solo_run(xllm_system):
    async with aiohttp.ClientSession() as s:
        solo = [await chat(s, xllm_system.url, q, temperature=0, max_tokens=16) for q in QUESTIONS]
        together = await asyncio.gather(
            *(chat(s, xllm_system.url, q, temperature=0, max_tokens=16) for q in QUESTIONS * 3)
        )
    for i, resp in enumerate(together):
        assert resp["choices"][0]["message"]["content"] == solo[i % 4]["choices"][0]["message"]["content"]


async def test_n_stop_and_logprobs(xllm_system):
    async with aiohttp.ClientSession() as s:
        greedy_n = await chat(s, xllm_system.url, QUESTIONS[0], temperature=0, max_tokens=12, n=2)
        sampled = await chat(s, xllm_system.url, QUESTIONS[1], temperature=1.0, max_tokens=12, n=3, seed=5)
        plain = await chat(s, xllm_system.url, QUESTIONS[0], temperature=0, max_tokens=30)
        text = plain["choices"][0]["message"]["content"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        stopped = await chat(s, xllm_system.url, QUESTIONS[0], temperature=0, max_tokens=30, stop=[stop])
        lp = await chat(s, xllm_system.url, QUESTIONS[0], temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    texts = [c["message"]["content"] for c in greedy_n["choices"]]
    assert len(texts) == 2 and texts[0] == texts[1]
    assert len({c["message"]["content"] for c in sampled["choices"]}) > 1
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    content = lp["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["token"] == entry["top_logprobs"][0]["token"]  # greedy picks the most likely
        assert abs(entry["logprob"] - entry["top_logprobs"][0]["logprob"]) < 1e-5


async def test_official_openai_client(xllm_system):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{xllm_system.url}/v1", api_key="none")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    resp = await client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=10, messages=[{"role": "user", "content": QUESTIONS[0]}]
    )
    assert resp.choices[0].message.content and resp.usage.completion_tokens <= 10
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=10,
            stream=True,
            messages=[{"role": "user", "content": QUESTIONS[0]}],
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == resp.choices[0].message.content
    completion = await client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert completion.choices[0].text
    await client.close()


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (json.dumps({"model": "smollm2", "messages": []}).encode(), 400),
        (json.dumps({"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404),
        (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "top_p": 7}).encode(), 400),
        (
            json.dumps(
                {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}
            ).encode(),
            400,
        ),
        (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi " * 9000}]}).encode(), 400),
        (b"\xff\xfe", 400),
    ],
)
async def test_bad_input_gets_openai_error_and_server_keeps_serving(xllm_system, body, status):
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{xllm_system.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == status
            error = (await r.json())["error"]
            assert error["message"] and error["type"]
        ok = await chat(s, xllm_system.url, "hi", max_tokens=3)
        assert ok["choices"][0]["message"]["content"] is not None


async def settled_free_blocks(system) -> dict[str, int]:
    """Free KV blocks per instance once nothing runs and two heartbeats agree."""
    last = None
    for _ in range(60):
        now = {i["instance_id"]: (i["load"]["free_blocks"], i["load"]["running"]) for i in system.instances()}
        if now == last and all(running == 0 for _, running in now.values()):
            return {k: free for k, (free, _) in now.items()}
        last = now
        await asyncio.sleep(1.0)
    raise AssertionError(f"instances never settled: {last}")


async def test_client_disconnect_returns_the_kv_pool(xllm_system):
    before = await settled_free_blocks(xllm_system)
    async with aiohttp.ClientSession() as s:
        payload = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": QUESTIONS[1]}],
            "stream": True,
            "max_tokens": 2000,
            "ignore_eos": True,
        }
        async with s.post(f"{xllm_system.url}/v1/chat/completions", json=payload) as r:
            async for line in r.content:
                if b"content" in line:
                    break  # got output; now hang up mid-stream
    assert await settled_free_blocks(xllm_system) == before


async def test_offline_job_completes_while_online_requests_are_served_first(xllm_system):
    from shared import subjects
    from shared.bus import connect
    from shared.jobs import iter_results, make_job
    from shared.messages import JobDone, JobRequest

    requests = [
        JobRequest(
            f"q{i}",
            "/v1/chat/completions",
            {
                "model": "smollm2",
                "max_tokens": 24,
                "ignore_eos": True,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Count to {i}."}],
            },
        )
        for i in range(20)
    ]
    requests.append(JobRequest("bad", "/v1/chat/completions", {"model": "smollm2", "messages": []}))
    job = make_job(requests)
    nc = await connect(xllm_system.nats_url, "test-jobs")
    try:
        js = nc.jetstream()
        await js.publish(subjects.JOBS_SUBMIT, job.encode(), headers={"Nats-Msg-Id": job.job_id})
        online_done_at = []
        async with aiohttp.ClientSession() as s:

            async def online(i: int) -> None:
                await chat(s, xllm_system.url, f"Say hello to {i}.", max_tokens=8)
                online_done_at.append(asyncio.get_running_loop().time())

            online_tasks, results, done_at = [], {}, None
            async for item in iter_results(js, job.job_id, timeout=300):
                if not online_tasks:  # the job is running now: online requests arrive in its midst
                    online_tasks = [asyncio.create_task(online(i)) for i in range(2)]
                if isinstance(item, JobDone):
                    done_at = asyncio.get_running_loop().time()
                    assert (item.completed, item.failed) == (20, 1)
                else:
                    results[item.custom_id] = item
            await asyncio.gather(*online_tasks)
    finally:
        await nc.close()
    assert len(results) == 21
    assert results["bad"].error and results["bad"].error["status"] == 400
    assert all(results[f"q{i}"].response["usage"]["completion_tokens"] == 24 for i in range(20))
    assert max(online_done_at) < done_at  # online requests were not queued behind the batch

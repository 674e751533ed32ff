"""`xllm bench serve` against a small in-test OpenAI-style server with known, injected delays.

The fake server answers /v1/chat/completions and /v1/completions as an SSE stream: a role-only
chunk at once (must not count as the first token), the first text chunk after `ttft`, then one chunk
per token every `itl`, then a usage chunk and [DONE]. So the harness's TTFT / ITL / TPOT / E2E and
their percentiles are known in advance and must come out right.
"""

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from xllm.bench import serve
from xllm.bench.client import Target, build_payload
from xllm.bench.metrics import latency_stats, summarize
from xllm.bench.runner import LoadPoint, run_load
from xllm.bench.workloads import BenchRequest, WorkloadSpec, generate


@dataclass
class Behaviour:
    ttft: list[float] = field(default_factory=lambda: [0.1])  # per request in arrival order (cycled)
    itl: float = 0.02
    usage_extra: int = 0  # added to the true completion_tokens in usage (a lying server)
    usage: bool = True
    fail_every: int = 0  # every k-th request (1-based) gets HTTP 503
    hang: set[int] = field(default_factory=set)  # request numbers (0-based) that never answer
    drop: set[int] = field(default_factory=set)  # request numbers whose connection closes mid-stream
    bodies: list[dict] = field(default_factory=list)


def make_app(b: Behaviour) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate_(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        k = len(b.bodies)
        b.bodies.append(body)
        if b.fail_every and (k + 1) % b.fail_every == 0:
            return web.json_response({"error": {"message": "busy", "type": "overloaded"}}, status=503)
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(obj: dict) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        def choice(text: str) -> dict:
            return {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}

        if chat:
            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        if k in b.hang:
            await asyncio.sleep(2.5)  # past the client timeout of 1 s
        await asyncio.sleep(b.ttft[k % len(b.ttft)])
        n = body["max_tokens"]
        for i in range(n):
            if i:
                await asyncio.sleep(b.itl)
            if k in b.drop and i == 2:
                request.transport.close()
                return resp
            await event({"choices": [choice(f" w{i}")]})
        if b.usage:
            usage = {"prompt_tokens": 7, "completion_tokens": n + b.usage_extra, "total_tokens": 7 + n}
            await event({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", generate_)
    app.router.add_post("/v1/completions", generate_)
    return app


@pytest.fixture
async def fake():
    """(base_url, behaviour): a fresh fake server on a free port; tests tweak the behaviour."""
    b = Behaviour()
    runner = web.AppRunner(make_app(b))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", b
    await runner.cleanup()


def reqs(n: int, max_tokens: int) -> list[BenchRequest]:
    return [BenchRequest(f"hello {i}", max_tokens, 2) for i in range(n)]


async def test_ttft_itl_tpot_e2e_match_injected_delays(fake):
    url, b = fake
    b.ttft, b.itl = [0.15], 0.03
    target = Target(url, "fake-model")
    run = await run_load(target, reqs(4, 9), LoadPoint(max_concurrency=4), seed=0, progress=False)
    s = summarize(run.results, run.duration_s, {})
    assert s["completed"] == 4 and s["failed"] == 0
    assert s["total_output_tokens"] == 36 and s["usage_mismatch"] == 0 and s["usage_missing"] == 0
    assert s["total_input_tokens"] == 4 * 7  # from usage, not the intended length
    assert s["ttft_ms"]["mean"] == pytest.approx(150, abs=25)
    assert s["itl_ms"]["p50"] == pytest.approx(30, abs=6)
    assert s["tpot_ms"]["mean"] == pytest.approx(30, abs=6)
    assert s["e2e_ms"]["mean"] == pytest.approx(150 + 8 * 30, abs=40)
    for r in run.results:
        assert len(r.itl) == 8 and r.chunks == 9
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 8)
    # 4 concurrent requests of ~0.39 s: the run takes ~0.39 s, not 4x that
    assert s["duration_s"] == pytest.approx(0.39, abs=0.15)
    assert s["output_throughput"] == pytest.approx(36 / s["duration_s"])


async def test_percentiles_of_known_ttfts(fake):
    url, b = fake
    b.ttft, b.itl = [0.02 * (i + 1) for i in range(10)], 0.005  # 20, 40, ..., 200 ms
    run = await run_load(Target(url, "fake-model"), reqs(10, 2), LoadPoint(max_concurrency=1), seed=0, progress=False)
    st = summarize(run.results, run.duration_s, {})["ttft_ms"]
    assert st["p50"] == pytest.approx(110, abs=12)  # numpy linear interpolation: 100..120 -> 110
    assert st["p90"] == pytest.approx(182, abs=12)
    assert st["p99"] == pytest.approx(198.2, abs=12)
    assert st["max"] == pytest.approx(200, abs=12)


def test_latency_stats_exact():
    st = latency_stats([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert st["mean"] == pytest.approx(50.5)
    assert st["p50"] == pytest.approx(50.5)
    assert st["p90"] == pytest.approx(90.1)
    assert st["p99"] == pytest.approx(99.01)
    assert latency_stats([])["p99"] is None


async def test_usage_mismatch_and_missing_usage(fake):
    url, b = fake
    b.ttft, b.itl, b.usage_extra = [0.0], 0.0, 1
    run = await run_load(Target(url, "m"), reqs(3, 4), LoadPoint(), seed=0, progress=False)
    s = summarize(run.results, run.duration_s, {})
    assert s["usage_mismatch"] == 3 and s["total_output_tokens"] == 15  # usage wins, mismatch flagged
    b.usage = False
    run = await run_load(Target(url, "m"), reqs(3, 4), LoadPoint(), seed=0, progress=False)
    s = summarize(run.results, run.duration_s, {})
    assert s["usage_missing"] == 3 and s["usage_mismatch"] == 0 and s["total_output_tokens"] == 12


async def test_errors_by_kind(fake):
    url, b = fake
    b.ttft, b.itl = [0.0], 0.01
    b.fail_every, b.hang, b.drop = 4, {0}, {1}  # requests 4 and 8 (1-based) get 503
    target = Target(url, "m", timeout_s=1.0)
    run = await run_load(target, reqs(8, 5), LoadPoint(max_concurrency=1), seed=0, progress=False)
    s = summarize(run.results, run.duration_s, {})
    assert s["errors"] == {"timeout": 1, "connection": 1, "http_503": 2}
    assert s["completed"] == 4 and s["failed"] == 4
    refused = Target("http://127.0.0.1:9", "m", timeout_s=2.0)  # nothing listens on port 9
    run = await run_load(refused, reqs(2, 3), LoadPoint(), seed=0, progress=False)
    assert summarize(run.results, run.duration_s, {})["errors"] == {"connection": 2}


async def test_request_body_ignore_eos_and_endpoints(fake):
    url, b = fake
    b.ttft, b.itl = [0.0], 0.0
    sys_req = BenchRequest("question", 6, 10, system="shared system prompt", group=0)
    await run_load(Target(url, "m", ignore_eos=True), [sys_req], LoadPoint(), seed=0, progress=False)
    body = b.bodies[-1]
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 6
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "shared system prompt"}
    run = await run_load(
        Target(url + "/v1/", "m", endpoint="completions"), reqs(1, 3), LoadPoint(), seed=0, progress=False
    )
    assert run.results[0].ok and run.results[0].chunks == 3
    assert b.bodies[-1]["prompt"] == "hello 0" and "ignore_eos" not in b.bodies[-1]


async def test_poisson_rate_paces_the_run(fake):
    url, b = fake
    b.ttft, b.itl = [0.0], 0.0
    run = await run_load(Target(url, "m"), reqs(30, 1), LoadPoint(request_rate=100.0), seed=1, progress=False)
    # 29 gaps of mean 10 ms: the run lasts ~0.29 s (seeded, so the exact figure is stable)
    assert 0.15 < run.duration_s < 0.6
    starts = sorted(r.start for r in run.results)
    assert starts[-1] - starts[0] == pytest.approx(run.duration_s, abs=0.1)


async def test_cli_writes_json_and_pngs_for_a_sweep(fake, tmp_path, capsys):
    url, b = fake
    b.ttft, b.itl = [0.02], 0.005
    args = [
        "--base-url",
        url,
        "--num-prompts",
        "6",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--sweep-rates",
        "50,100",
        "--goodput",
        "ttft:1000",
        "tpot:1000",
        "--ignore-eos",
        "--result-dir",
        str(tmp_path),
        "--result-name",
        "t",
        "--no-progress",
        "--warmup",
        "2",
    ]
    # the fake server runs on this test's loop; the CLI runs its own loop (asyncio.run) in a thread
    assert await asyncio.wait_for(asyncio.to_thread(serve.main, args), 60) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["target"]["model"] == "fake-model"  # from /v1/models
    assert [r["load"]["request_rate"] for r in doc["runs"]] == [50.0, 100.0]
    for r in doc["runs"]:
        assert r["summary"]["completed"] == 6 and len(r["requests"]) == 6
        assert r["summary"]["goodput"]["attainment"] == 1.0
    assert len(b.bodies) == 2 * (6 + 2)  # warm-up requests were sent, but not counted
    for name in ("t-latency-cdf.png", "t-sweep.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    out = capsys.readouterr().out
    assert "Output token throughput" in out and "TTFT" in out


def test_cli_rejects_bad_options(capsys):
    assert serve.main(["--model", "m", "--goodput", "ttft=5"]) == 2
    assert serve.main(["--model", "m", "--sweep-rates", "1,x"]) == 2
    assert serve.main(["--model", "m", "--workload", "offline"]) == 2  # needs --nats
    assert "error" in capsys.readouterr().err


def test_workloads_are_seeded_but_salted():
    spec = WorkloadSpec("synthetic", input_len=50, output_len=20, range_ratio=0.2)
    a, b = generate(spec, 20, seed=3), generate(spec, 20, seed=3)
    assert [r.input_len for r in a] == [r.input_len for r in b]
    assert all(40 <= r.input_len <= 60 and 16 <= r.max_tokens <= 24 for r in a)
    assert all(len(r.prompt.split()) == r.input_len for r in a)
    # same words after the salt, different salts: no prompt-cache hits across runs
    assert [r.prompt.split()[6:] for r in a] == [r.prompt.split()[6:] for r in b]
    assert sum(x.prompt.split()[:6] == y.prompt.split()[:6] for x, y in zip(a, b)) == 0
    chat = generate(WorkloadSpec("chat", input_len=200, output_len=100), 4000, seed=0)
    assert np.mean([r.input_len for r in chat]) == pytest.approx(200, rel=0.1)
    assert np.mean([r.max_tokens for r in chat]) == pytest.approx(100, rel=0.1)


def test_shared_prefix_groups():
    spec = WorkloadSpec("shared-prefix", input_len=8, output_len=4, prefix_groups=3, prefix_len=64)
    rs = generate(spec, 30, seed=0)
    systems: dict[int, Any] = {}
    for r in rs:
        assert systems.setdefault(r.group, r.system) == r.system and len(r.system.split()) == 64
    assert len(systems) == 3 and len(set(systems.values())) == 3
    assert len({r.prompt for r in rs}) == 30
    assert [r.group for r in rs] != sorted(r.group for r in rs)  # groups interleave in arrival order
    assert rs[0].input_len == 72


def test_code_edit_prompts_hold_the_code_the_answer_repeats():
    a, b = generate(WorkloadSpec("code-edit", output_len=50), 5, seed=1), generate(WorkloadSpec("code-edit"), 5, seed=1)
    assert [r.prompt.split("\n", 1)[1] for r in a] == [r.prompt.split("\n", 1)[1] for r in b]  # seeded after the salt
    assert all(r.prompt.count("def ") == 3 and "renamed to" in r.prompt and r.max_tokens == 50 for r in a)
    assert len({r.prompt for r in a}) == 5


def test_multimodal_workload_repeats_a_share_of_its_images_and_salts_the_rest():
    spec = WorkloadSpec("synthetic", input_len=8, output_len=4, images_per_request=2, image_repeat=0.5, image_size=32)
    a, b = generate(spec, 40, seed=2), generate(spec, 40, seed=2)
    urls = [u for r in a for u in r.images]
    assert all(len(r.images) == 2 and u.startswith("data:image/png;base64,") for r in a for u in r.images)
    pool = set(urls) & {u for r in b for u in r.images}  # seeded: the same in both runs; the rest is fresh
    assert 0 < len(pool) <= 8
    assert 25 <= sum(u in pool for u in urls) <= 55  # about half of the 80
    body = build_payload(a[0], Target("http://x", "m"))
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
    assert serve.main(["--model", "m", "--images-per-request", "1", "--endpoint", "completions"]) == 2

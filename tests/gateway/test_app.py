"""The gateway over a real nats-server, against a scripted router/worker (tests/gateway/conftest.py)."""

import asyncio
import json
import socket

import aiohttp
import nats
import pytest
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI, NotFoundError

from services.gateway import server
from services.gateway.app import GATEWAY
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayService
from services.gateway.telemetry import GatewayMetrics
from shared.engine.config import ModelConfig
from shared.messages import InstanceInfo, SeqOutput
from shared.registry import InstanceRegistry
from shared.service import serve
from tests.gateway.conftest import FakeTokenizer, ScriptedRouter, hold, reply_words
from tests.waiting import until

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
TOK = FakeTokenizer()


async def post(client: TestClient, path: str, body: dict, **kw) -> tuple[int, dict]:
    async with client.post(path, json=body, **kw) as resp:
        return resp.status, await resp.json()


async def sse_events(resp: aiohttp.ClientResponse) -> list:
    """The data of every SSE event: parsed JSON, or the string '[DONE]'."""
    text = await resp.text()
    assert text.endswith("\n\n")
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def assert_serves(client: TestClient) -> None:
    status, body = await post(client, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Hello world"


# --- good requests -----------------------------------------------------------------------------------


async def test_chat_non_streaming_with_exact_usage(client, router: ScriptedRouter) -> None:
    router.script = reply_words(cached=3)
    status, body = await post(client, "/v1/chat/completions", {**CHAT, "temperature": 0})
    assert status == 200
    req = router.requests[-1]
    prompt = TOK.encode_chat(CHAT["messages"])
    assert req.prompt_token_ids == prompt  # the gateway tokenized it, once
    assert req.params["temperature"] == 0 and req.params["max_tokens"] == 256 - len(prompt)
    assert req.priority == 0
    assert body["id"] == req.request_id and body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    n = len(prompt)
    assert body["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": 11,
        "total_tokens": n + 11,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert not router.aborts  # a finished request is not aborted


async def test_chat_streaming_sse_format_with_usage(client, router) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with client.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    role, hello, world, usage = events[:-1]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["object"] == "chat.completion.chunk" and role["usage"] is None
    assert hello["choices"][0]["delta"] == {"content": "Hello"} and hello["choices"][0]["finish_reason"] is None
    assert world["choices"][0]["delta"] == {"content": " world"} and world["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 11
    assert usage["usage"]["prompt_tokens"] == len(TOK.encode_chat(CHAT["messages"]))
    assert len({e["id"] for e in events[:-1]}) == 1


async def test_streaming_without_include_usage_has_no_usage(client, router) -> None:
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        events = await sse_events(resp)
    assert len(events) == 4 and all("usage" not in e for e in events[:-1])


async def test_n_choices_are_indexed(client, router) -> None:
    status, body = await post(client, "/v1/chat/completions", {**CHAT, "n": 3})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 33
    async with client.post("/v1/completions", json={"prompt": "x", "n": 2, "stream": True}) as resp:
        events = await sse_events(resp)
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == {0: "Hello world", 1: "Hello world"}


async def test_chat_logprobs_shape(client, router) -> None:
    status, body = await post(client, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2})
    assert status == 200 and router.requests[-1].params["logprobs"] == 2
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 11 and "".join(c["token"] for c in content) == "Hello world"
    assert content[0]["logprob"] == -0.5 and content[0]["bytes"] == [72]
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -1.5]
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True, "logprobs": True}) as resp:
        events = await sse_events(resp)
    assert len(events[1]["choices"][0]["logprobs"]["content"]) == 5  # "Hello"


async def test_completions_string_tokens_stream_and_logprobs(client, router) -> None:
    status, body = await post(client, "/v1/completions", {"model": "test-model", "prompt": "ab", "max_tokens": 5})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello world" and router.requests[-1].prompt_token_ids == TOK.encode("ab")
    assert router.requests[-1].params["max_tokens"] == 5
    status, body = await post(client, "/v1/completions", {"prompt": [10, 11], "logprobs": 1, "echo": False})
    assert router.requests[-1].prompt_token_ids == [10, 11]
    lp = body["choices"][0]["logprobs"]
    assert (
        lp["tokens"][:2] == ["H", "e"] and lp["text_offset"][:3] == [0, 1, 2] and lp["top_logprobs"][0] == {"H": -0.5}
    )
    status, body = await post(client, "/v1/completions", {"prompt": "ab", "echo": True})
    assert body["choices"][0]["text"] == "abHello world"
    async with client.post("/v1/completions", json={"prompt": "ab", "stream": True, "echo": True}) as resp:
        events = await sse_events(resp)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["abHello", " world"]


async def test_models(client) -> None:
    async with client.get("/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["test-model"]
    assert body["data"][0]["max_model_len"] == 256
    async with client.get("/v1/models/test-model") as resp:
        assert resp.status == 200
    async with client.get("/v1/models/other") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


# --- errors: each gets its status, and the app keeps serving -------------------------------------------


BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b'{"messages": "\xff"}', 400, "invalid_utf8"),
    ("POST", "/v1/chat/completions", b"", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", json.dumps({**CHAT, "temperature": "x"}).encode(), 400, "invalid_value"),
    ("POST", "/v1/chat/completions", json.dumps({**CHAT, "top_p": 7}).encode(), 400, "invalid_value"),
    ("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": 1}).encode(), 400, "invalid_type"),
    ("POST", "/v1/chat/completions", json.dumps({**CHAT, "messages": []}).encode(), 400, "invalid_value"),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "x", "content": ""}]}).encode(),
        400,
        "invalid_value",
    ),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps({**CHAT, "max_tokens": 10_000}).encode(),
        400,
        "context_length_exceeded",
    ),
    ("POST", "/v1/completions", json.dumps({"prompt": [1, 10**6]}).encode(), 400, "invalid_value"),
    ("POST", "/v1/completions", json.dumps({"prompt": "x" * 1000}).encode(), 400, "context_length_exceeded"),
    ("POST", "/v1/chat/completions", json.dumps({**CHAT, "model": "gpt-9"}).encode(), 404, "model_not_found"),
    ("GET", "/v1/nothing", b"", 404, "unknown_url"),
    ("GET", "/v1/chat/completions", b"", 405, "method_not_allowed"),
    ("POST", "/v1/models", b"{}", 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method, path, data, status, code", BAD)
async def test_bad_input_gets_4xx_then_serves(client, router, method, path, data, status, code) -> None:
    async with client.request(method, path, data=data, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        err = (await resp.json())["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}
    assert not router.requests  # nothing reached the bus
    await assert_serves(client)


async def test_body_over_the_limit_is_413(make_client, router) -> None:
    client = await make_client(max_body_bytes=2048)
    big = json.dumps({**CHAT, "pad": "x" * 5000}).encode()
    async with client.post("/v1/chat/completions", data=big) as resp:  # refused from Content-Length
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"

    async def chunked():
        for _ in range(10):
            yield b" " * 1000

    async with client.post("/v1/chat/completions", data=chunked()) as resp:  # no length: counted
        assert resp.status == 413
    await assert_serves(client)


async def test_api_key(make_client, router) -> None:
    client = await make_client(api_key="sekret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
    async with client.get("/admin/instances") as resp:
        assert resp.status == 401
    async with client.get("/metrics") as resp:  # probes and scrapers need no key
        assert resp.status == 200
    auth = {"Authorization": "Bearer sekret"}
    assert (await post(client, "/v1/chat/completions", CHAT, headers=auth))[0] == 200
    assert len(router.requests) == 1


@pytest.mark.parametrize("code, kind", [(429, "overloaded"), (503, "server_error"), (400, "invalid_request_error")])
async def test_router_errors_become_http_statuses(client, router, code, kind) -> None:
    async def refuse(r: ScriptedRouter, req) -> None:
        error = {"message": "cannot place it", "type": kind, "status": code}
        await r.send(req, finished=True, error=error, instance="")

    router.script = refuse
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status == code and (await resp.json())["error"]["type"] == kind
        assert ("Retry-After" in resp.headers) == (code != 400)
    router.script = reply_words()
    await assert_serves(client)


async def test_a_refusal_by_the_ttft_target_keeps_the_routers_retry_after(client, router) -> None:
    async def refuse(r: ScriptedRouter, req) -> None:
        error = {"message": "past the target", "type": "overloaded", "status": 429, "code": "slo_unattainable"}
        await r.send(req, finished=True, error={**error, "retry_after": 7}, instance="")

    router.script = refuse
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "7"
        assert (await resp.json())["error"]["code"] == "slo_unattainable"


async def test_error_after_first_output_is_an_sse_event(client, router) -> None:
    async def fail_midway(r: ScriptedRouter, req) -> None:
        await r.send(req, [SeqOutput(0, [10], "H")])
        await r.send(req, finished=True, error={"message": "worker died", "type": "server_error", "status": 500})

    router.script = fail_midway
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        events = await sse_events(resp)
    assert events[-2]["error"]["message"] == "worker died" and events[-1] == "[DONE]"
    status, body = await post(client, "/v1/chat/completions", CHAT)
    assert status == 500 and body["error"]["message"] == "worker died"


async def test_first_output_timeout_is_504_and_aborts(make_client, router) -> None:
    client = await make_client(first_token_timeout_s=0.3)
    router.script = hold(asyncio.Event())
    status, body = await post(client, "/v1/chat/completions", CHAT)
    assert status == 504 and body["error"]["code"] == "timeout"
    assert await router.wait_abort(router.requests[-1].request_id)
    router.script = reply_words()
    await assert_serves(client)


async def test_stall_mid_stream_ends_with_error_event_and_abort(make_client, router) -> None:
    client = await make_client(inter_token_timeout_s=0.3)

    async def stall(r: ScriptedRouter, req) -> None:
        await r.send(req, [SeqOutput(0, [10], "H")])

    router.script = stall
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        events = await sse_events(resp)
    assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert await router.wait_abort(router.requests[-1].request_id)
    status, _ = await post(client, "/v1/chat/completions", CHAT)
    assert status == 504


async def test_client_disconnect_mid_stream_aborts(client, router) -> None:
    gate = asyncio.Event()

    async def first_then_wait(r: ScriptedRouter, req) -> None:
        await r.send(req, [SeqOutput(0, [10], "H")])
        await gate.wait()
        await r.send(req, [SeqOutput(0, [11], "i", "stop")], finished=True)

    router.script = first_then_wait
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    await resp.content.readline()  # the role chunk is there: the stream is live
    resp.close()  # hang up
    assert await router.wait_abort(router.requests[-1].request_id)
    gate.set()
    router.script = reply_words()
    await assert_serves(client)


async def test_client_disconnect_while_waiting_aborts(make_client, router) -> None:
    client = await make_client(first_token_timeout_s=30)
    router.script = hold(asyncio.Event())
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/chat/completions", json=CHAT, timeout=aiohttp.ClientTimeout(total=0.3))
    assert await router.wait_abort(router.requests[-1].request_id)


async def test_inflight_limit_gives_429_then_recovers(make_client, router) -> None:
    client = await make_client(max_inflight=1, retry_after_s=2)
    gate = asyncio.Event()
    router.script = hold(gate, reply_words())
    first = asyncio.create_task(post(client, "/v1/chat/completions", CHAT))
    await until(lambda: router.requests, 20, "the request never reached the router")
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "2"
        assert (await resp.json())["error"]["code"] == "too_many_requests"
    gate.set()
    assert (await first)[0] == 200
    await assert_serves(client)


async def test_publish_on_a_closed_bus_is_503(make_client, gw_nats_url) -> None:
    conn = await nats.connect(gw_nats_url)
    backend = Backend(conn, retry_after_s=1)
    await backend.start()
    await conn.close()
    client = await make_client()
    client.app[GATEWAY].backend = backend
    status, body = await post(client, "/v1/chat/completions", CHAT)
    assert status == 503 and body["error"]["code"] == "bus_unavailable"


# --- health, admin, metrics --------------------------------------------------------------------------


class FakeView:
    def __init__(self, *instances: InstanceInfo):
        self.live = list(instances)

    def instances(self) -> list[InstanceInfo]:
        return self.live


def inst(iid: str, role: str, state: str = "ready") -> InstanceInfo:
    return InstanceInfo(iid, role, "m", 42, "host1", state, running=1, waiting=2, free_blocks=3, total_blocks=4)


@pytest.mark.parametrize(
    "view, status",
    [
        (None, 503),
        (FakeView(), 503),
        (FakeView(inst("a", "colocated")), 200),
        (FakeView(inst("a", "colocated", "draining")), 503),
        (FakeView(inst("p", "prefill")), 503),
        (FakeView(inst("p", "prefill"), inst("d", "decode", "starting")), 503),
        (FakeView(inst("p", "prefill"), inst("d", "decode")), 200),
    ],
)
async def test_health_needs_a_full_path_to_a_worker(make_client, view, status) -> None:
    client = await make_client(view=view)
    async with client.get("/health") as resp:
        assert resp.status == status


async def test_admin_instances(make_client) -> None:
    mixed = inst("p", "prefill")
    mixed.roles, mixed.cost, mixed.load = ["prefill", "decode"], {"step": 0.03}, {"prefill_tokens": 512}
    client = await make_client(view=FakeView(mixed, inst("d", "decode")))
    async with client.get("/admin/instances") as resp:
        body = await resp.json()
    assert body[0] == {
        "instance_id": "p",
        "role": "prefill",
        "model": "m",
        "pid": 42,
        "host": "host1",
        "state": "ready",
        "updated_at": 0.0,
        "load": {"running": 1, "waiting": 2, "free_blocks": 3, "total_blocks": 4, "prefill_tokens": 512},
        "counters": {},
        "cost": {"step": 0.03},
        "roles": ["prefill", "decode"],
    }
    assert [i["role"] for i in body] == ["prefill", "decode"]


async def test_metrics(client, router) -> None:
    await assert_serves(client)
    await post(client, "/v1/chat/completions", {**CHAT, "n": 0})
    async with client.get("/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    prompt = len(TOK.encode_chat(CHAT["messages"]))
    assert 'xllm_gateway_requests_total{route="/v1/chat/completions",status="200"} 1' in text
    assert 'xllm_gateway_requests_total{route="/v1/chat/completions",status="400"} 1' in text
    assert "xllm_gateway_time_to_first_token_seconds_count 1" in text
    assert "xllm_gateway_inter_token_latency_seconds_count 1" in text
    assert "xllm_gateway_e2e_request_latency_seconds_count 1" in text
    assert f"xllm_gateway_prompt_tokens_total {prompt}" in text
    assert "xllm_gateway_generation_tokens_total 11" in text
    assert "xllm_gateway_running_requests 0" in text
    assert "xllm_gateway_slo_requests_total{" not in text  # no targets set: nothing counted


async def test_slo_outcomes_are_counted_against_the_targets(make_client, router) -> None:
    client = await make_client(slo_ttft_ms=60_000, slo_tpot_ms=60_000)
    await assert_serves(client)
    async with client.get("/metrics") as resp:
        assert 'xllm_gateway_slo_requests_total{outcome="met"} 1.0' in await resp.text()
    metrics = GatewayMetrics.create()
    metrics.record_slo(0.2, 0.05, ttft_ms=500, tpot_ms=None)
    metrics.record_slo(0.7, 0.05, ttft_ms=500, tpot_ms=40)
    metrics.record_slo(0.7, 0.01, ttft_ms=500, tpot_ms=40)
    metrics.record_slo(0.7, 0.01, ttft_ms=None, tpot_ms=None)  # no targets: not counted
    counts = {
        o: metrics.registry.get_sample_value("xllm_gateway_slo_requests_total", {"outcome": o})
        for o in ("met", "missed_ttft", "missed_ttft_tpot")
    }
    assert counts == {"met": 1, "missed_ttft": 1, "missed_ttft_tpot": 1}


# --- the official openai client ---------------------------------------------------------------------


async def test_openai_client(client, router) -> None:
    oa = AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    models = await oa.models.list()
    assert [m.id for m in models.data] == ["test-model"]
    r = await oa.chat.completions.create(model="test-model", messages=CHAT["messages"], max_tokens=20)
    assert r.choices[0].message.content == "Hello world" and r.usage.completion_tokens == 11
    stream = await oa.chat.completions.create(
        model="test-model", messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    async for ev in stream:
        parts += [c.delta.content or "" for c in ev.choices]
        usage = ev.usage or usage
    assert "".join(parts) == "Hello world" and usage.completion_tokens == 11
    c = await oa.completions.create(model="test-model", prompt="ab", max_tokens=5)
    assert c.choices[0].text == "Hello world"
    stream = await oa.completions.create(model="test-model", prompt="ab", stream=True)
    assert "".join([ev.choices[0].text async for ev in stream]) == "Hello world"
    with pytest.raises(NotFoundError):
        await oa.chat.completions.create(model="nope", messages=CHAT["messages"])
    await oa.close()


# --- the service as `python -m services.gateway` wires it: NATS, registry, tokenizer, HTTP -------------


async def test_serve_wires_bus_registry_and_http(gw_nats_url, nc, router, monkeypatch) -> None:
    cfg = ModelConfig("llama", 259, 8, 8, 1, 1, 1, 8, max_position_embeddings=256, name="fake-llm")
    monkeypatch.setattr(server, "load_tokenizer", lambda name: (FakeTokenizer(), cfg))
    monkeypatch.setattr(server, "load_generation_defaults", lambda name: {"temperature": 0.25, "top_k": 7})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(GatewayService(GatewayConfig(port=port, nats=gw_nats_url, model="fake-llm")), stop, started)
    )
    await asyncio.wait_for(started.wait(), 10)
    registry = await InstanceRegistry.open(nc.jetstream())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/health") as resp:
                assert resp.status == 503  # no worker yet
            await registry.heartbeat(inst("gw-test-worker", "colocated"))
            async with asyncio.timeout(10):  # until the gateway's live view has the put
                while await _status(http, f"{base}/health") != 200:
                    await asyncio.sleep(0.02)
            async with http.get(f"{base}/admin/instances") as resp:
                assert "gw-test-worker" in [i["instance_id"] for i in await resp.json()]
            body = {"model": "fake-llm", "messages": CHAT["messages"]}
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"] == "Hello world"
            params = router.requests[-1].params  # the model's sampling defaults, where the body is silent
            assert params["temperature"] == 0.25 and params["top_k"] == 7
    finally:
        await registry.remove("gw-test-worker")
        stop.set()
        await asyncio.wait_for(task, 10)


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


async def test_metrics_include_each_instance_load_and_kv(make_client) -> None:
    worker = inst("d", "decode")
    worker.counters = {"prefix_queries": 8, "prefix_hits": 2, "kv_transfer_bytes": 1024}
    client = await make_client(view=FakeView(worker))
    async with client.get("/metrics") as resp:
        text = await resp.text()
    assert 'xllm_instance_kv_blocks_free{instance="d",role="decode"} 3.0' in text
    assert 'xllm_instance_kv_blocks_used{instance="d",role="decode"} 1.0' in text
    assert 'xllm_instance_waiting{instance="d",role="decode"} 2.0' in text
    assert 'xllm_instance_prefix_cache_hit_rate{instance="d",role="decode"} 0.25' in text
    assert 'xllm_instance_kv_transfer_bytes_total{instance="d",role="decode"} 1024.0' in text

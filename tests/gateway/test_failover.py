"""Gateway failover over a real nats-server and instance registry, with a scripted router/worker double.

Each script looks at `req.attempt` to play a different worker per submission; the registry is a real
NATS KV bucket (one per test, short TTL) followed by a real InstanceView, where a test removes an
instance to play a worker that died.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

import nats
import pytest

from shared import subjects
from shared.instance_view import InstanceView
from shared.messages import GenerateRequest, InstanceInfo, SeqOutput, StreamChunk
from tests.gateway.conftest import FakeTokenizer, MakeClient, ScriptedRouter, reply_words

pytestmark = pytest.mark.integration

TOK = FakeTokenizer()
CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
PROMPT = TOK.encode_chat(CHAT["messages"])
UNAVAILABLE = {"message": "engine shutting down", "type": "server_error", "status": 503}


TTL = 1.0


@pytest.fixture
async def registry(nc: nats.NATS) -> AsyncIterator[tuple[InstanceView, str, str]]:
    """A live view of a registry with two instances (a, b) that stay live while the test runs."""
    view = await InstanceView.open(nc, bucket=f"fo_{uuid.uuid4().hex[:10]}", ttl=TTL)
    a, b = "fo-a", "fo-b"
    beating = {a, b}

    async def beat() -> None:
        while True:
            for iid in list(beating):
                await view.registry.heartbeat(InstanceInfo(iid, "colocated", "test-model", 1, "h"))
            await asyncio.sleep(TTL / 4)

    heart = asyncio.create_task(beat())
    await view.wait(lambda: len(view.instances()) == 2)
    view.beating = beating  # a test stops one's heartbeats by removing it from here
    yield view, a, b
    heart.cancel()
    await view.close()
    await nc.jetstream().delete_key_value(view.registry.bucket)


async def remove(view: InstanceView, iid: str) -> None:
    """Instance `iid` dies: no more heartbeats, its entry removed (as a TTL lapse would)."""
    view.beating.discard(iid)
    await view.registry.remove(iid)


async def send(
    nc: nats.NATS,
    req: GenerateRequest,
    text: str = "",
    finish: str | None = None,
    instance: str = "w",
    error: dict | None = None,
    n: int = 1,
    seq: int = 0,
) -> None:
    """Publish one chunk (number `seq` of the request's stream) as worker `instance`: `text` (one
    token per byte) for each of n sequences."""
    outs = [asdict(SeqOutput(i, TOK.encode(text, add_special_tokens=False), text, finish)) for i in range(n)]
    done = finish is not None or error is not None
    chunk = StreamChunk(
        req.request_id, outs if text or finish else [], done, len(req.prompt_token_ids), 0, instance, error, seq
    )
    await nc.publish(req.reply_subject, chunk.encode())


async def read_until(resp, content: str) -> str:
    """Read a chat SSE stream up to the event whose delta is `content`; what was read."""
    read = ""
    while f'"content":"{content}"' not in read.rpartition("data:")[2]:
        line = await resp.content.readline()
        assert line, f"the stream ended before {content!r}"
        read += line.decode()
    return read


async def sse_text(resp, read: str = "") -> tuple[str, list]:
    """(the streamed content, every event) of a chat SSE response, after what was `read` of it already."""
    raw = read + await resp.text()
    events = [json.loads(b[6:]) for b in raw.strip().split("\n\n") if b != "data: [DONE]"]
    text = "".join(c["delta"].get("content", "") for e in events for c in e.get("choices", []))
    return text, events


async def test_resubmits_when_the_instance_leaves_before_any_output(
    make_client: MakeClient, router: ScriptedRouter, registry, nc
) -> None:
    reg, a, b = registry
    client = await make_client(view=reg, watch=True)
    router.instances = [a]
    first_sent = asyncio.Event()

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.attempt == 0:
            first_sent.set()  # worker a took it, then dies silently
            return
        await reply_words()(r, req)

    router.script = script
    task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await first_sent.wait()
    router.instances = [b]
    await remove(reg, a)  # a leaves the registry (TTL lapsed / killed)
    resp = await asyncio.wait_for(task, 5)
    body = await resp.json()
    assert resp.status == 200 and body["choices"][0]["message"]["content"] == "Hello world"
    first, second = router.requests
    assert second.attempt == 1 and second.request_id == f"{first.request_id}-r1"
    assert second.prompt_token_ids == first.prompt_token_ids == PROMPT and second.params == first.params
    assert second.priority == first.priority
    assert body["id"] == first.request_id and body["usage"]["prompt_tokens"] == len(PROMPT)
    assert await router.wait_abort(first.request_id)  # the old attempt is dropped wherever it still is
    assert second.request_id not in router.aborts


async def test_continues_after_partial_output_with_the_generated_tokens(make_client, router, registry, nc) -> None:
    reg, a, b = registry
    client = await make_client(view=reg, watch=True)
    router.instances = [a]
    stale = asyncio.Event()

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.attempt == 0:
            await send(nc, req, "Hel", instance=a)
            await stale.wait()  # a "dead" worker that still sends: must not reach the client
            await send(nc, req, "STALE", "stop", instance=a)
            return
        stale.set()
        await send(nc, req, "lo", instance=b)
        await send(nc, req, "!", "stop", instance=b)

    router.script = script
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "min_tokens": 4, "seed": 7}
    async with client.post("/v1/chat/completions", json=body) as resp:
        read = await read_until(resp, "Hel")  # "Hel" reached the client
        router.instances = [b]
        await remove(reg, a)
        text, events = await sse_text(resp, read)
    assert text == "Hello!"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == len(PROMPT) and usage["completion_tokens"] == 6
    first, second = router.requests
    generated = TOK.encode("Hel", add_special_tokens=False)
    assert second.prompt_token_ids == PROMPT + generated
    assert second.params["max_tokens"] == 20 - 3 and second.params["min_tokens"] == 1
    assert second.params["seed"] == 7 and second.attempt == 1
    assert {e["id"] for e in events} == {first.request_id}


async def test_a_stream_with_output_waits_out_refusals_of_its_continuation(make_client, router, registry, nc) -> None:
    """Its worker left, and for a moment the router has no instance to take the rest (the only other one is
    full, or restarting): the client cannot retry a stream that sent output, so the gateway tries again,
    past max_submissions, until an instance takes it."""
    reg, a, b = registry
    client = await make_client(view=reg, watch=True, max_submissions=2)
    router.instances = [a]

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.attempt == 0:
            await send(nc, req, "Hel", instance=a)
            return
        await send(nc, req, "lo", "stop", instance=b)

    router.script = script
    no_instance = {"message": "no ready instances", "type": "server_error", "status": 503}
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        read = await read_until(resp, "Hel")
        router.instances, router.refusals = [b], [no_instance] * 3
        await remove(reg, a)
        text, events = await sse_text(resp, read)
    assert text == "Hello" and events[-1]["choices"][0]["finish_reason"] == "stop"
    assert [r.attempt for r in router.requests] == [0, 1, 2, 3, 4] and not router.refusals
    # Before any output the client can retry itself: a refusal is final.
    router.requests.clear()
    router.refusals = [no_instance]
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503 and len(router.requests) == 1


async def test_worker_503_before_output_resubmits_then_exhausts(make_client, router) -> None:
    client = await make_client(max_submissions=2)

    async def unavailable(r: ScriptedRouter, req: GenerateRequest) -> None:
        await r.send(req, finished=True, error=UNAVAILABLE)

    router.script = unavailable
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        body = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert body["error"]["code"] == "worker_unavailable" and "2 attempts" in body["error"]["message"]
    assert "engine shutting down" in body["error"]["message"]
    assert [r.attempt for r in router.requests] == [0, 1]

    async def once(r: ScriptedRouter, req: GenerateRequest) -> None:
        await (unavailable if req.attempt == 0 else reply_words())(r, req)

    router.script = once
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"] == "Hello world"


async def test_a_decode_the_prefill_could_not_reach_is_named_on_the_resubmission(make_client, router, nc) -> None:
    """The registry may list a decode worker that died until its entry lapses; the router hears of it from the
    gateway's next attempt (a plain 503 names nobody)."""
    client = await make_client()
    router.instances = ["p", "d"]
    unreachable = {**UNAVAILABLE, "message": "decode worker d unreachable", "code": "decode_unreachable"}

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.attempt < 2:
            await send(nc, req, instance="p", error=unreachable if req.attempt == 0 else UNAVAILABLE)
            return
        await send(nc, req, "Hello", "stop", instance="p")

    router.script = script
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"] == "Hello"
    assert [r.avoid for r in router.requests] == [[], ["d"], ["d"]]


async def test_503_after_max_submissions_when_instances_keep_leaving(make_client, router, registry, nc) -> None:
    reg, _, _ = registry
    client = await make_client(view=reg, watch=True)  # max_submissions: 3 by default
    router.instances = [f"gone-{uuid.uuid4().hex[:6]}"]  # never heartbeats: lost once the TTL is over
    router.script = lambda r, req: asyncio.sleep(0)
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        body = await resp.json()
        assert resp.status == 503
    assert body["error"]["code"] == "worker_unavailable" and "left the registry" in body["error"]["message"]
    assert len(router.requests) == 3
    for req in router.requests:
        assert await router.wait_abort(req.request_id)


async def test_n_above_1_starts_over_when_nothing_was_sent(make_client, router, nc) -> None:
    client = await make_client()

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.attempt == 0:
            await send(nc, req, "Hel", n=2)
            await send(nc, req, error=UNAVAILABLE)
            return
        await reply_words()(r, req)

    router.script = script
    async with client.post("/v1/chat/completions", json={**CHAT, "n": 2}) as resp:
        body = await resp.json()
    assert resp.status == 200 and [c["message"]["content"] for c in body["choices"]] == ["Hello world"] * 2
    assert router.requests[1].prompt_token_ids == PROMPT and router.requests[1].params["max_tokens"] == 20
    # Streaming, the client already has output: n > 1 cannot continue, the stream ends with an error.
    router.requests.clear()
    router.script = script
    async with client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True}) as resp:
        events = (await resp.text()).strip().split("\n\n")
    assert json.loads(events[-2][6:])["error"]["code"] == "worker_unavailable" and len(router.requests) == 1


async def test_prefill_leaving_after_decode_streams_is_no_failover(make_client, router, registry, nc) -> None:
    reg, prefill, decode = registry
    client = await make_client(view=reg, watch=True)
    router.instances = [prefill, decode]
    go_on = asyncio.Event()

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        await send(nc, req, "Hel", instance=decode)
        await go_on.wait()
        await send(nc, req, "lo", "stop", instance=decode)

    router.script = script
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        read = await read_until(resp, "Hel")  # the decode instance streams
        await remove(reg, prefill)  # its part was done: the decode instance holds the request now
        await reg.wait(lambda: reg.get(prefill) is None)  # the gateway's view has seen it go
        go_on.set()
        text, _ = await sse_text(resp, read)
    assert text == "Hello"
    assert len(router.requests) == 1


async def test_decode_leaving_after_the_prefill_sent_the_first_token_fails_over(
    make_client, router, registry, nc
) -> None:
    """The prefill worker streams the first token; the decode worker that should go on dies."""
    reg, prefill, decode = registry
    client = await make_client(view=reg, watch=True)
    router.instances = [prefill, decode]

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        if req.attempt == 0:
            await send(nc, req, "H", instance=prefill)  # then the hand-off goes nowhere
            return
        await send(nc, req, "ello", "stop", instance=prefill)  # attempt 1: colocated-style fallback

    router.script = script
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        read = await read_until(resp, "H")  # the first token reached the client
        await remove(reg, decode)
        text, _ = await sse_text(resp, read)
    assert text == "Hello"
    assert router.requests[1].prompt_token_ids == PROMPT + TOK.encode("H", add_special_tokens=False)


async def test_chunks_from_prefill_and_decode_are_put_back_in_order(make_client, router, nc) -> None:
    """NATS orders messages per publisher only: the decode worker's chunks may overtake the prefill's."""
    client = await make_client()
    router.instances = ["prefill-x", "decode-x"]

    async def script(r: ScriptedRouter, req: GenerateRequest) -> None:
        await send(nc, req, "el", instance="decode-x", seq=1)
        await send(nc, req, "lo", "stop", instance="decode-x", seq=2)
        await asyncio.sleep(0.05)
        await send(nc, req, "H", instance="prefill-x", seq=0)

    router.script = script
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        text, _ = await sse_text(resp)
    assert text == "Hello"


async def test_router_silent_or_absent(make_client, router, nc) -> None:
    client = await make_client(route_timeout_s=0.2, max_submissions=2)
    await router.stop()
    async with client.post("/v1/chat/completions", json=CHAT) as resp:  # nobody listens: at once
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "router_unavailable"
    seen: list[str] = []

    async def silent(msg) -> None:
        seen.append(GenerateRequest.decode(msg.data).request_id)

    sub = await nc.subscribe(subjects.ROUTER_GENERATE, cb=silent)
    aborts = await router.nc.subscribe(subjects.ABORT, cb=router._on_abort)
    try:
        async with client.post("/v1/chat/completions", json=CHAT) as resp:
            body = await resp.json()
        assert resp.status == 503 and "did not answer" in body["error"]["message"]
        assert len(seen) == 2 and seen[1] == f"{seen[0]}-r1"
        for rid in seen:
            assert await router.wait_abort(rid)  # a late placement is cancelled
    finally:
        await sub.unsubscribe()
        await aborts.unsubscribe()

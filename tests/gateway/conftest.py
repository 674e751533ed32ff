"""Gateway test fixtures: a real nats-server, a byte-level fake tokenizer, a scripted router/worker."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import create_app
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.protocol import ModelInfo
from shared import subjects
from shared.messages import AbortRequest, GenerateRequest, RouteReply, SeqOutput, StreamChunk
from xllm.natsd import NatsServer


class FakeTokenizer:
    """Byte-level: token = byte + 3; 1 = BOS (added by encode), 2 = EOS. The chat template refuses
    the "tool" role, as a real Jinja template may refuse a conversation."""

    vocab_size = 259
    eos_token_ids = (2,)
    chat_template = "<fake>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [1, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        kept = (b"<s>" if i < 3 else bytes([i - 3]) for i in ids if i >= 3 or not skip_special_tokens)
        return b"".join(kept).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("this template has no tool role")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


MODEL = ModelInfo(name="test-model", max_model_len=256, vocab_size=FakeTokenizer.vocab_size)


@pytest.fixture
def tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


@pytest.fixture
def model() -> ModelInfo:
    return ModelInfo(MODEL.name, MODEL.max_model_len, MODEL.vocab_size)


@pytest.fixture(scope="session")
def gw_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server of the gateway tests' own (its subjects and streams are theirs alone)."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server.url


Script = Callable[["ScriptedRouter", GenerateRequest], Awaitable[None]]


class ScriptedRouter:
    """Test double of the router and a worker: answers each GenerateRequest with a RouteReply naming
    `instances` (none by default: nothing for the gateway to watch), then runs `script`."""

    def __init__(self, nc: nats.NATS):
        self.nc = nc
        self.requests: list[GenerateRequest] = []
        self.aborts: list[str] = []
        self.script: Script = reply_words()
        self.instances: list[str] = []
        self.refusals: list[dict] = []  # the next submissions are refused with these errors, in order
        self._subs: list = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._subs = [
            await self.nc.subscribe(subjects.ROUTER_GENERATE, cb=self._on_request),
            await self.nc.subscribe(subjects.ABORT, cb=self._on_abort),
        ]

    async def stop(self) -> None:
        subs, self._subs = self._subs, []  # a second stop (the fixture's, after a test's) is a no-op
        for sub in subs:
            await sub.unsubscribe()
        for task in self._tasks:
            task.cancel()

    async def _on_request(self, msg: nats.aio.msg.Msg) -> None:
        req = GenerateRequest.decode(msg.data)
        self.requests.append(req)
        if self.refusals:
            await msg.respond(RouteReply(req.request_id, error=self.refusals.pop(0)).encode())
            return
        if msg.reply:
            await msg.respond(RouteReply(req.request_id, list(self.instances)).encode())
        task = asyncio.create_task(self.script(self, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_abort(self, msg: nats.aio.msg.Msg) -> None:
        self.aborts.append(AbortRequest.decode(msg.data).request_id)

    async def send(
        self,
        req: GenerateRequest,
        outputs: list[SeqOutput] = (),
        finished: bool = False,
        error: dict | None = None,
        cached: int = 0,
        instance: str = "fake-0",
    ) -> None:
        """A chunk as worker `instance` would send it ("": as the router itself, for its own errors)."""
        chunk = StreamChunk(
            req.request_id, [asdict(o) for o in outputs], finished, len(req.prompt_token_ids), cached, instance, error
        )
        await self.nc.publish(req.reply_subject, chunk.encode())

    async def wait_abort(self, request_id: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while request_id not in self.aborts and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return request_id in self.aborts


def reply_words(pieces: tuple[str, ...] = ("Hello", " world"), finish: str = "stop", cached: int = 0) -> Script:
    """A script: every one of the n sequences emits `pieces` (one chunk each), then `finish`.
    Logprobs, when asked, are -0.5 for the token and -0.5, -1.5, ... for its top alternatives."""
    tok = FakeTokenizer()

    async def script(router: ScriptedRouter, req: GenerateRequest) -> None:
        n, k = req.params["n"], req.params["logprobs"]
        for j, piece in enumerate(pieces):
            last = j == len(pieces) - 1
            outs = []
            for i in range(n):
                ids = tok.encode(piece, add_special_tokens=False)
                lps = None if k is None else [[-0.5, [[t, -0.5 - r] for r in range(k)]] for t in ids]
                outs.append(SeqOutput(i, ids, piece, finish if last else None, lps))
            await router.send(req, outs, finished=last, cached=cached)

    return script


def hold(event: asyncio.Event, then: Script | None = None) -> Script:
    """A script that sends nothing until `event` is set (then runs `then`, if given)."""

    async def script(router: ScriptedRouter, req: GenerateRequest) -> None:
        await event.wait()
        if then is not None:
            await then(router, req)

    return script


@pytest.fixture
async def nc(gw_nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(gw_nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def router(nc: nats.NATS) -> AsyncIterator[ScriptedRouter]:
    r = ScriptedRouter(nc)
    await r.start()
    yield r
    await r.stop()


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client(nc: nats.NATS, router: ScriptedRouter) -> AsyncIterator[MakeClient]:
    """make_client(view=None, watch=False, **GatewayConfig overrides) -> a started aiohttp TestClient.
    With `watch`, the backend also fails requests over when an instance leaves `view`."""
    made: list[tuple[TestClient, Backend]] = []

    async def make(view: object = None, watch: bool = False, **overrides: object) -> TestClient:
        config = GatewayConfig(**{"first_token_timeout_s": 2.0, "inter_token_timeout_s": 2.0, **overrides})
        backend = Backend(
            nc,
            config.retry_after_s,
            view=view if watch else None,
            max_submissions=config.max_submissions,
            route_timeout_s=config.route_timeout_s,
        )
        await backend.start()
        app = create_app(config, FakeTokenizer(), MODEL, backend, view)
        client = TestClient(TestServer(app))
        await client.start_server()
        made.append((client, backend))
        return client

    yield make
    for client, backend in made:
        await client.close()
        await backend.close()


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()

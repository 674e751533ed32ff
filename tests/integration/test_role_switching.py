"""Mixed workers switched between prefill and decode while they serve: nothing is lost or run twice, and
greedy output equals the in-process engine's (real NATS of the test's own, the real default model, the
workers and the router in this process)."""

import asyncio
import uuid

import pytest

from services.mixed.worker import MixedWorker
from services.router.config import RouterConfig
from services.router.roles import RoleSwitcher, Switch
from services.router.service import RouterService
from services.worker.config import WorkerConfig
from shared import bus, subjects
from shared.bus import connect
from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.sampling_params import SamplingParams
from shared.instance_view import InstanceView
from shared.messages import Ack, GenerateRequest, RoleChange, RouteReply, StreamChunk
from shared.service import serve
from tests.waiting import until
from xllm.natsd import NatsServer

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Count from one to five.",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a large ocean.",
]
TOKENS = 24


async def test_switching_mixed_workers_under_load_loses_and_reruns_nothing(tmp_path):
    llm = LLM(EngineConfig(model="smollm2", kv_cache_memory=64 << 20, num_threads=1))
    prompts = [llm.encode(q, chat=True) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    want = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    natsd = NatsServer(tmp_path / "nats")
    natsd.start()
    nc = await connect(natsd.url, name="test", connect_wait_s=2.0)
    tag = uuid.uuid4().hex[:6]
    common = {"nats": natsd.url, "model": "smollm2", "kv_cache_memory": 64 << 20, "num_threads": 1}
    a = MixedWorker(WorkerConfig(**common, instance_id=f"a-{tag}", initial_role="prefill", data_host="127.0.0.1"))
    b = MixedWorker(WorkerConfig(**common, instance_id=f"b-{tag}", initial_role="decode", data_host="127.0.0.1"))
    stop, started = asyncio.Event(), [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(serve(w, stop, s)) for w, s in zip((a, b), started)]
    view = await InstanceView.open(nc)
    router = RouterService(RouterConfig(nats=natsd.url, mode="disaggregated"), view=view)
    switcher = RoleSwitcher(router.slo)
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 120)
        await router.start(nc)
        await view.wait(lambda: {i.role for i in view.instances()} == {"prefill", "decode"})

        async def switch(prefill: MixedWorker, decode: MixedWorker) -> None:
            """Swap the roles, as the router's switcher does, and wait until routers see it."""
            for worker, role in ((prefill, "prefill"), (decode, "decode")):
                assert await switcher.apply(nc, Switch(worker.instance_id, role, "test"))
            roles = {prefill.instance_id: "prefill", decode.instance_id: "decode"}
            await view.wait(lambda: all(view.get(iid).role == role for iid, role in roles.items()))

        chunks: dict[str, list[StreamChunk]] = {}
        routed: list[list[str]] = []
        first_seen = [asyncio.Event() for _ in prompts]

        async def run(i: int) -> None:
            rid = f"r{i}-{tag}"
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            req = GenerateRequest(rid, prompts[i], params.to_dict(), inbox)
            reply = await bus.request(nc, subjects.ROUTER_GENERATE, req, RouteReply, timeout=30)
            assert reply.error is None, reply.error
            routed.append(reply.instances)
            got = chunks.setdefault(rid, [])
            while not (got and any(c.finished for c in got)):
                got.append(StreamChunk.decode((await sub.next_msg(timeout=120)).data))
                assert got[-1].error is None, got[-1].error
                first_seen[i].set()
            await sub.unsubscribe()

        runs = [asyncio.create_task(run(i)) for i in range(3)]
        await first_seen[0].wait()  # request 0 streams: switch while the others prefill or decode
        await switch(prefill=b, decode=a)
        runs += [asyncio.create_task(run(i)) for i in range(3, 5)]
        await first_seen[3].wait()
        await switch(prefill=a, decode=b)
        runs.append(asyncio.create_task(run(5)))
        await asyncio.wait_for(asyncio.gather(*runs), 300)

        for i in range(len(prompts)):
            got = sorted(chunks[f"r{i}-{tag}"], key=lambda c: c.seq)
            assert [c.seq for c in got] == list(range(len(got)))  # each chunk once: nothing ran twice
            assert [t for c in got for o in c.outputs for t in o["token_ids"]] == want[i]
        assert {iid for pair in routed for iid in pair} == {a.instance_id, b.instance_id}
        assert {tuple(pair) for pair in routed} >= {(a.instance_id, b.instance_id), (b.instance_id, a.instance_id)}
        assert (a.switches, b.switches) == (2, 2) and switcher.switches == {"prefill": 2, "decode": 2}
        await until(lambda: not a.engine.stats["running"] and not b.engine.stats["running"], 30, "work left")

        bad = RoleChange(a.instance_id, "encoder")
        ack = await bus.request(nc, subjects.worker_role(a.instance_id), bad, Ack, timeout=5)
        assert not ack.ok and ack.error["status"] == 400 and a.acting == "prefill"
    finally:
        await router.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await view.close()
        await nc.close()
        natsd.stop()

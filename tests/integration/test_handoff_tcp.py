"""A prefill worker and a decode worker on "different hosts": the KV goes over the TCP data plane, layer
by layer while the prompt computes, and greedy output equals the in-process engine's (real NATS, real
default model, the workers in this process)."""

import asyncio
import uuid

import pytest

import services.worker.kv_transfer
from services.decode.worker import DecodeWorker
from services.prefill.worker import PrefillWorker
from services.worker.config import WorkerConfig
from shared import bus, subjects
from shared.engine.config import EngineConfig
from shared.engine.llm import LLM
from shared.engine.sampling_params import SamplingParams
from shared.messages import AbortRequest, Ack, GenerateRequest, StreamChunk
from shared.service import serve
from tests.waiting import until

pytestmark = pytest.mark.integration


async def test_tcp_hand_off_streams_the_kv_and_equals_the_in_process_engine(nats_server, nc, monkeypatch):
    def no_shared_memory(name):
        raise AssertionError("a reader on another host must not map the segment")

    monkeypatch.setattr(services.worker.kv_transfer, "attach_if_there", no_shared_memory)
    announced = []  # layers announced to the reader one by one, during the prompt's step
    announce = services.worker.kv_transfer.KvExport.announce
    monkeypatch.setattr(
        services.worker.kv_transfer.KvExport, "announce", lambda self, n: announced.append(n) or announce(self, n)
    )
    llm = LLM(EngineConfig(model="smollm2", kv_cache_memory=64 << 20, num_threads=1))
    prompt = llm.encode("Name three colours of the rainbow.", chat=True)
    params = SamplingParams(temperature=0, max_tokens=16)
    (want,) = llm.generate([prompt], params)
    tag = uuid.uuid4().hex[:6]
    common = {"nats": nats_server, "model": "smollm2", "kv_cache_memory": 64 << 20, "num_threads": 1}
    prefill = PrefillWorker(WorkerConfig(**common, instance_id=f"prefill-{tag}", data_host="127.0.0.1"))
    decode = DecodeWorker(WorkerConfig(**common, instance_id=f"decode-{tag}", data_host="localhost"))
    stop, started = asyncio.Event(), [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(serve(w, stop, s)) for w, s in zip((prefill, decode), started)]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 120)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = GenerateRequest(f"tcp-{tag}", prompt, params.to_dict(), inbox, decode_instance=decode.instance_id)
        ack = await bus.request(nc, subjects.worker_generate(prefill.instance_id), req, Ack, timeout=10)
        assert ack.ok, ack.error
        chunks = []
        while not (chunks and chunks[-1].finished):
            chunks.append(StreamChunk.decode((await sub.next_msg(timeout=60)).data))
            assert chunks[-1].error is None, chunks[-1].error
        chunks.sort(key=lambda c: c.seq)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert chunks[0].instance_id == prefill.instance_id  # the first token
        assert {c.instance_id for c in chunks[1:]} == {decode.instance_id}
        tokens = [t for c in chunks for o in c.outputs for t in o["token_ids"]]
        assert tokens == want.outputs[0].token_ids
        assert decode.metrics.get_sample_value("xllm_kv_transfer_bytes_total") > 0
        assert set(range(1, 31)) <= set(announced)  # SmolLM2's 30 layers, streamed one at a time

        # An abort while the decode worker waits for a long prompt's KV: the copy stops, blocks are freed.
        free = decode.engine.engine.block_manager.num_free_blocks
        long = GenerateRequest(f"long-{tag}", prompt * 20, params.to_dict(), inbox, decode_instance=decode.instance_id)
        assert (await bus.request(nc, subjects.worker_generate(prefill.instance_id), long, Ack, timeout=10)).ok
        bm = decode.engine.engine.block_manager
        await until(lambda: long.request_id in decode.copies, 60, "the decode worker never took the hand-off")
        assert bm.num_free_blocks < free  # it has reserved and is reading
        await nc.publish(subjects.ABORT, AbortRequest(long.request_id).encode())
        await until(lambda: bm.num_free_blocks == free and not decode.copies, 60, "the blocks were not freed")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

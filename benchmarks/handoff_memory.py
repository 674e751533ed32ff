"""Memory of prefill -> decode hand-offs: a prefill and a decode worker in this process, over a real
nats-server, take one request after another (20-200-token prompts, 4 tokens out). Every 50 requests: the
process's anonymous RSS, and which Python object types grew since request 50 (a leak of Python objects
shows there; native memory only in the RSS).

    PYTHONPATH=. python benchmarks/handoff_memory.py [--requests 300]
"""

import argparse
import asyncio
import collections
import gc
import random
import tempfile

from services.decode.worker import DecodeWorker
from services.prefill.worker import PrefillWorker
from services.worker.config import WorkerConfig
from shared import bus, subjects
from shared.engine.sampling_params import SamplingParams
from shared.messages import Ack, GenerateRequest, StreamChunk
from shared.service import serve
from xllm.natsd import NatsServer


def anon_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon:"))


def object_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


async def one_request(nc, rng: random.Random, i: int) -> None:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    prompt = [rng.randrange(1000, 40000) for _ in range(rng.randint(20, 200))]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    req = GenerateRequest(f"r{i}", prompt, params.to_dict(), inbox, decode_instance="decode-mem")
    ack = await bus.request(nc, subjects.worker_generate("prefill-mem"), req, Ack, timeout=30)
    assert ack.ok, ack.error
    while not StreamChunk.decode((await sub.next_msg(timeout=60)).data).finished:
        pass
    await sub.unsubscribe()


async def main(requests: int) -> None:
    with NatsServer(tempfile.mkdtemp()) as server:
        common = {
            "nats": server.url,
            "model": "smollm2",
            "kv_cache_memory": 128 << 20,
            "num_threads": 1,
            "data_host": "127.0.0.1",
        }
        workers = [
            PrefillWorker(WorkerConfig(**common, instance_id="prefill-mem")),
            DecodeWorker(WorkerConfig(**common, instance_id="decode-mem")),
        ]
        stop, started = asyncio.Event(), [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(serve(w, stop, s)) for w, s in zip(workers, started)]
        await asyncio.gather(*(s.wait() for s in started))
        nc, rng, base = await bus.connect(server.url, "handoff-memory"), random.Random(0), None
        for i in range(1, requests + 1):
            await one_request(nc, rng, i)
            if i % 50 == 0:
                counts = object_counts()
                base = base or counts
                grown = [(kind, n) for kind, n in (counts - base).most_common(5)]
                print(f"{i:5d} requests: {anon_mib()} MiB anonymous; object types grown since 50: {grown}", flush=True)
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300)
    asyncio.run(main(parser.parse_args().requests))

"""What a prefill -> decode KV hand-off costs, and whether it overlaps the prefill (SmolLM2-135M shapes).

    PYTHONPATH=. python benchmarks/kv_transfer.py [--tokens 128,512,2048]

For each prompt length, best of 3:
- prefill: one forward step of the prompt, alone;
- shm (a decode worker on this host): how long after the prompt's step the importer has every layer:
  the export copied after the step (`write_rest`), then read out of shared memory;
- tcp (a decode worker on another host, here over 127.0.0.1): the same figure when the export is
  copied and sent after the step ("sequential") and when each layer is copied and sent right after
  its forward, inside the step (the engine's kv_sink, "streamed"), plus the step's own time while it
  streams (what the overlap costs the prefill).
The prefill runs on a thread and the importer on the event loop of this one process; in `xllm up`
they are two processes.
"""

import argparse
import asyncio
import time

import torch

from services.worker.kv_transfer import KvDataServer, KvExport, import_kv
from services.worker.shm import SegmentPool
from shared.engine.config import ModelConfig
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence

SMOLLM2 = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
HOST = "127.0.0.1"


async def hand_off(
    src: ModelRunner,
    dst: ModelRunner,
    server: KvDataServer,
    segments: SegmentPool,
    n: int,
    streamed: bool,
    reader_host: str,
) -> tuple[float, float]:
    """(the prompt's step in ms, ms from its end until the importer has every layer)."""
    blocks = list(range(-(-n // 16)))
    seq = Sequence("p", list(range(n)), SamplingParams())
    seq.block_table = blocks
    export = KvExport("r", src.kv_layout, n, segments)
    server.exports["r"] = export

    async def write(kv: torch.Tensor) -> None:
        dst.write_kv(blocks, kv)

    importing = asyncio.create_task(
        import_kv(export.handle(HOST, server.port), dst.kv_layout, len(blocks), reader_host, write)
    )
    while streamed and not export.streaming:  # the importer is connected before the prefill computes
        await asyncio.sleep(0.001)
    sink = (lambda layer: export.stream_layer(src, layer, blocks)) if streamed else None
    start = time.perf_counter()
    await asyncio.to_thread(src.run, [ScheduledSeq(seq, n)], sink)
    step_done = time.perf_counter()
    await asyncio.to_thread(export.write_rest, src, blocks)  # nothing left when it streamed
    export.finish({"sequences": []})
    await importing
    done = time.perf_counter()
    await export.received.wait()
    export.close()
    return (step_done - start) * 1000, (done - step_done) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="128,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = CausalLM(SMOLLM2, 4096).eval()
    src = ModelRunner(model, 160, 16, torch.device("cpu"), torch.float32)
    dst = ModelRunner(model, 160, 16, torch.device("cpu"), torch.float32)
    server, segments = KvDataServer(), SegmentPool(max_idle_bytes=1 << 30)
    await server.start(HOST)
    print(
        f"{'tokens':>6} {'MB':>5} {'prefill ms':>10} | after the prompt, ms: {'shm':>6} "
        f"{'tcp sequential':>14} {'tcp streamed':>12} | prefill ms, streaming"
    )
    for n in (int(t) for t in args.tokens.split(",")):
        mb = n * ModelRunner.block_bytes(SMOLLM2, 1, torch.float32) / 1e6
        await hand_off(src, dst, server, segments, n, True, "elsewhere")  # warm-up: pages, segments
        alone = min([await _timed_step(src, n) for _ in range(3)])
        shm = min([(await hand_off(src, dst, server, segments, n, False, HOST))[1] for _ in range(3)])
        tcp = min([(await hand_off(src, dst, server, segments, n, False, "elsewhere"))[1] for _ in range(3)])
        runs = [await hand_off(src, dst, server, segments, n, True, "elsewhere") for _ in range(3)]
        print(
            f"{n:>6} {mb:>5.1f} {alone:>10.0f} | {'':>21}{shm:>6.1f} {tcp:>14.1f} "
            f"{min(r[1] for r in runs):>12.1f} | {min(r[0] for r in runs):.0f}"
        )
    await server.stop()
    segments.close()


async def _timed_step(src: ModelRunner, n: int) -> float:
    seq = Sequence("p", list(range(n)), SamplingParams())
    seq.block_table = list(range(-(-n // 16)))
    start = time.perf_counter()
    await asyncio.to_thread(src.run, [ScheduledSeq(seq, n)])
    return (time.perf_counter() - start) * 1000


if __name__ == "__main__":
    asyncio.run(main())

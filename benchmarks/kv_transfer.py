"""What a prefill -> decode KV hand-off costs next to the prefill it follows (SmolLM2-135M shapes).

    PYTHONPATH=. python benchmarks/kv_transfer.py [--tokens 128,512,2048]

For each prompt length: the prefill time of that many tokens (one step), the export into shared memory
(prefill side) into a fresh segment and into a reused one (the worker's SegmentPool), and the import into
another pool over shared memory and over TCP on 127.0.0.1 (decode side); best of 3.
"""

import argparse
import asyncio
import time

import torch

from shared.bench.timing import best_ms
from shared.engine.config import ModelConfig
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence
from shared.kv_transfer import KvDataServer, KvExport, SegmentPool, import_kv

SMOLLM2 = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="128,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = CausalLM(SMOLLM2, 4096).eval()
    src = ModelRunner(model, 160, 16, torch.device("cpu"), torch.float32)
    dst = ModelRunner(model, 160, 16, torch.device("cpu"), torch.float32)
    server = KvDataServer()
    await server.start("127.0.0.1")
    segments = SegmentPool(max_idle_bytes=1 << 30)
    print(f"{'tokens':>6} {'MB':>6} {'prefill ms':>10} {'export ms: fresh':>16} {'reused':>6} "
          f"{'import shm ms':>13} {'import tcp ms':>13}")
    for n in (int(t) for t in args.tokens.split(",")):
        blocks = list(range(-(-n // 16)))
        seq = Sequence("p", list(range(n)), SamplingParams())
        seq.block_table = blocks
        prefill = best_ms(lambda seq=seq, n=n: src.run([ScheduledSeq(seq, n)]), repeats=3, warmup=False)
        export = KvExport("r", src, blocks, n)
        fresh = best_ms(lambda blocks=blocks, n=n: KvExport("x", src, blocks, n).close(), repeats=3, warmup=False)
        reused = best_ms(lambda blocks=blocks, n=n: KvExport("x", src, blocks, n, segments).close(received=True),
                         repeats=3, warmup=True)
        server.exports["r"] = export
        shm = min([await _timed(import_kv(export.handle("here", server.port), dst, blocks, "here"))
                   for _ in range(3)])
        tcp = min([await _timed(import_kv(export.handle("127.0.0.1", server.port), dst, blocks, "elsewhere"))
                   for _ in range(3)])
        print(f"{n:>6} {export.nbytes / 1e6:>6.1f} {prefill:>10.0f} {fresh:>16.1f} {reused:>6.1f} {shm:>13.1f} "
              f"{tcp:>13.1f}")
        export.close()
    await server.stop()
    segments.close()


async def _timed(coro) -> float:
    start = time.perf_counter()
    await coro
    return (time.perf_counter() - start) * 1000


if __name__ == "__main__":
    asyncio.run(main())

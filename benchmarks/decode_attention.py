"""Decode attention over the paged KV cache: the C++ kernel (reads blocks in place) vs the torch path
(gathers the blocks, then SDPA), for one decode step of SmolLM2's 30 layers.

    PYTHONPATH=. python benchmarks/decode_attention.py [--threads 2]

SmolLM2 shapes (9 query heads, 3 KV heads, head_dim 64, 16-token blocks); every sequence has the same
context length; each layer has its own KV (as in the model) and the caches are flushed between layers
by touching 64 MB, so the KV comes from memory as it does in a real step (the flushes' own time is
printed beside). Best of 5.
"""

import argparse

import torch

from shared.engine import cpu_kernels
from shared.engine.attention import _attend
from xllm.bench.timing import best_ms

HEADS, KV_HEADS, DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="1x256,8x256,32x192,64x192,8x1024", help="BATCHxCONTEXT,...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    flush = torch.zeros(16 << 20)
    print(f"ms per decode step, {LAYERS} layers (threads {args.threads})")
    print(f"{'batch':>5} {'context':>7} {'KV MB':>6} {'flush only':>11} {'torch':>7} {'kernel':>7}")
    for case in args.cases.split(","):
        batch, context = (int(v) for v in case.split("x"))
        flush_only, slow, fast = time_case(batch, context, kernels, flush)
        mb = 2 * LAYERS * batch * context * KV_HEADS * DIM * 4 / 1e6
        print(f"{batch:>5} {context:>7} {mb:>6.0f} {flush_only:>11.1f} {slow:>7.1f} {fast:>7.1f}", flush=True)


def time_case(batch: int, context: int, kernels, flush: torch.Tensor) -> tuple[float, float, float]:
    """ms per step: the cache flushes alone, then with the torch path, then with the kernel."""
    blocks = -(-context // BLOCK)
    shape = (batch * blocks, BLOCK, KV_HEADS, DIM)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(LAYERS)]
    tables = torch.randperm(batch * blocks).view(batch, blocks)  # blocks scattered, as after a while
    lens = torch.full((batch,), context)
    q = torch.randn(batch, HEADS, DIM)

    def step(attend) -> None:
        for k, v in caches:
            flush.add_(1.0)
            attend(k, v)

    flush_only = best_ms(lambda: step(lambda k, v: None))
    slow = best_ms(lambda: step(lambda k, v: _attend(q.unsqueeze(2), k, v, tables, None, DIM**-0.5)))
    fast = best_ms(lambda: step(lambda k, v: kernels.paged_decode_attention(q, k, v, tables, lens, DIM**-0.5)))
    return flush_only, slow, fast


if __name__ == "__main__":
    main()

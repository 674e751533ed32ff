"""The block-format matmul kernel (csrc/quant_kernels.cpp) against oneDNN's fp32 matmul on a prepacked weight,
over all of SmolLM2-135M's linear layers (30 layers' distinct weights and lm_head, as one decode step reads
them: from memory, not from cache), by number of activation rows.

    PYTHONPATH=. python benchmarks/quant_matmul.py [--threads 2] [--rows 1,2,4,8,16,32,64,128]
    PYTHONPATH=. python benchmarks/quant_matmul.py --hidden 768 --intermediate 2048 --formats q4_1,q4_k,q8_0,q6_k

(--hidden / --intermediate: SmolLM2's shapes scaled, for the K-quants, whose rows must be whole 256-weight
super-blocks: SmolLM2's 576 is not; their weights are made by the tests' quantizers, tests/engine/gguf_writer.py.)

ms per step (all layers), best of 5, forms interleaved; GB/s is the bytes of weights read per step over its
time (compare with benchmarks/roofline.py's read bandwidth).
"""

import argparse

import torch

from shared.engine import cpu_kernels, ops
from shared.engine.quant import KERNEL_FORMATS
from tests.engine.gguf_writer import quantize_blocks
from xllm.bench.timing import best_ms

VOCAB = 49152


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--formats", default="q4_1,q8_0")
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2's; q/k/v take hidden + 2 * hidden / 3 rows")
    parser.add_argument("--intermediate", type=int, default=1536)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = cpu_kernels.load_quant().quantized_linear
    h, i = args.hidden, args.intermediate
    layer = [(h + 2 * (h // 3), h), (h, h), (2 * i, h), (h, i)]  # qkv, o, gate_up, down
    shapes = [s for _ in range(30) for s in layer] + [(VOCAB, h)]
    weights = [torch.randn(o, i) * 0.05 for o, i in shapes]
    packed = [ops.prepack_weight(w) for w in weights]
    formats = args.formats.split(",")
    blocks = {f: [quantize_blocks(w, f) for w in weights] for f in formats}
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    print(f"ms per step of all linear layers (threads {args.threads}), GB/s of weights read in brackets")
    print(f"{'rows':>5} {'fp32 packed':>16}" + "".join(f" {f:>16}" for f in formats))
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        fp32 = best_ms(
            lambda xs=xs: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for x, p in zip(xs, packed)]
        )
        cells = f" {fp32:>8.2f} ({fp32_bytes / fp32 / 1e6:>5.1f})"
        for f in formats:
            code, ws = KERNEL_FORMATS[f], blocks[f]
            ms = best_ms(lambda xs=xs, ws=ws, code=code: [kernel(x, w.data, code) for x, w in zip(xs, ws)])
            cells += f" {ms:>8.2f} ({sum(w.data.numel() for w in ws) / ms / 1e6:>5.1f})"
        print(f"{rows:>5}{cells}", flush=True)


if __name__ == "__main__":
    main()

"""The block-format matmul kernel (csrc/quant_kernels.cpp) against oneDNN's fp32 matmul on a prepacked weight,
over all of SmolLM2-135M's linear layers (30 layers' distinct weights and lm_head, as one decode step reads
them: from memory, not from cache), by number of activation rows.

    PYTHONPATH=. python benchmarks/quant_matmul.py [--threads 2] [--rows 1,2,4,8,16,32,64,128]

ms per step (all layers), best of 5, forms interleaved; GB/s is the bytes of weights read per step over its
time (compare with benchmarks/roofline.py's read bandwidth).
"""

import argparse

import torch

from shared.engine import cpu_kernels, ops
from shared.engine.quant import KERNEL_FORMATS, quantize_weight
from xllm.bench.timing import best_ms

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LM_HEAD = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--formats", default="q4_1,q8_0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = cpu_kernels.load_quant().quantized_linear
    shapes = [s for _ in range(30) for s in LAYER_SHAPES] + [LM_HEAD]
    weights = [torch.randn(o, i) * 0.05 for o, i in shapes]
    packed = [ops.prepack_weight(w) for w in weights]
    formats = args.formats.split(",")
    blocks = {f: [quantize_weight(w, f) for w in weights] for f in formats}
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

"""The block-format matmul kernel (csrc/quant_kernels.cpp) against oneDNN's fp32 matmul on a prepacked weight,
for SmolLM2-135M's linear shapes, by number of activation rows.

    PYTHONPATH=. python benchmarks/quant_matmul.py [--threads 2] [--rows 1,8,32,128]

ms per call, best of 7. The kernel's GB/s is the weight's bytes read per call over its time (at few rows the
kernel streams the weight; compare with benchmarks/roofline.py's read bandwidth).
"""

import argparse

import torch

from shared.engine import cpu_kernels, ops
from shared.engine.quant import KERNEL_FORMATS, quantize_weight
from xllm.bench.timing import best_ms

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,32,128")
    parser.add_argument("--formats", default="q8_0,q4_1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load_quant()
    formats = args.formats.split(",")
    print(f"ms per call (threads {args.threads}); kernel GB/s of blocks read in brackets")
    print(f"{'matmul':>8} {'rows':>5} {'fp32 packed':>12}" + "".join(f" {f:>16}" for f in formats))
    for name, (out, inp) in SHAPES.items():
        weight = torch.randn(out, inp) * 0.05
        packed = ops.prepack_weight(weight)
        blocks = {f: quantize_weight(weight, f) for f in formats}
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, inp)
            fp32 = best_ms(lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), 7)
            cells = ""
            for f, w in blocks.items():
                ms = best_ms(lambda x=x, w=w, f=f: kernels.quantized_linear(x, w.data, KERNEL_FORMATS[f]), 7)
                cells += f" {ms:>8.3f} ({w.data.numel() / ms / 1e6:>4.1f})"
            print(f"{name:>8} {rows:>5} {fp32:>12.3f}{cells}", flush=True)


if __name__ == "__main__":
    main()

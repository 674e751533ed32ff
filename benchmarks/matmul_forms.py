"""Which matmul form is fastest here for the model's linear layers, by number of rows (tokens in a step).

    PYTHONPATH=. python benchmarks/matmul_forms.py [--threads 2]

SmolLM2-135M's per-layer weights (gate_up 3072x576, down 576x1536, qkv 960x576, o 576x576) x 30 layers,
plus lm_head (49152x576); best of 5 per form. The forms: F.linear (x @ W.T); mm(W, x.T).T, whose output is
transposed, so it is also timed with the .contiguous() copy that the next op needs; oneDNN's matmul on a
prepacked weight; and the engine's C++ kernel for a few rows. shared/engine/ops.py's `linear` picks from
these.
"""

import argparse

import torch
import torch.nn.functional as F

from shared.engine import cpu_kernels, ops
from xllm.bench.timing import best_ms

SHAPES = [(3072, 576), (576, 1536), (960, 576), (576, 576)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,256")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES] + [torch.randn(49152, 576)]
    packed = [ops.prepack_weight(w) for w in weights]
    print(f"ms per step for all linear layers (threads {args.threads})")
    print(
        f"{'rows':>5} {'F.linear':>9} {'mm(W,x.T).T':>12} {'+contiguous':>12} {'oneDNN packed':>14} {'C++ kernel':>11}"
    )
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, w.shape[1]) for w in weights]
        linear = best_ms(lambda xs=xs: [F.linear(x, w) for x, w in zip(xs, weights)])
        w_xt = best_ms(lambda xs=xs: [torch.mm(w, x.t()).t() for x, w in zip(xs, weights)])
        w_xt_c = best_ms(lambda xs=xs: [torch.mm(w, x.t()).t().contiguous() for x, w in zip(xs, weights)])
        onednn = best_ms(
            lambda xs=xs: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for x, p in zip(xs, packed)]
        )
        kernel = (
            best_ms(lambda xs=xs: [kernels.linear_small_batch(x, w) for x, w in zip(xs, weights)])
            if kernels and m <= 16
            else float("nan")
        )
        print(f"{m:>5} {linear:>9.1f} {w_xt:>12.1f} {w_xt_c:>12.1f} {onednn:>14.1f} {kernel:>11.1f}", flush=True)


if __name__ == "__main__":
    main()

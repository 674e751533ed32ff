"""Which matmul form is fastest here for the model's linear layers, by number of rows (tokens in a step).

    python benchmarks/matmul_forms.py [--threads 2]

SmolLM2-135M's per-layer weights (gate_up 3072x576, down 576x1536, qkv 960x576, o 576x576) x 30 layers,
plus lm_head (49152x576); best of 5 per form. This is what shared/engine/model.py's Linear chooses from.
"""

import argparse

import torch
import torch.nn.functional as F

from shared.bench.timing import best_ms

SHAPES = [(3072, 576), (576, 1536), (960, 576), (576, 576)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,32,64,256")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES] + [torch.randn(49152, 576)]
    transposed = [w.t().contiguous() for w in weights]
    print(f"ms per step for all linear layers (threads {args.threads})")
    print(f"{'rows':>5} {'F.linear(x, W)':>15} {'mm(W, x.T).T':>13} {'x @ W_t (copy)':>15}")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {i: torch.randn(m, i) for _, i in SHAPES + [(0, 576)]}
        linear = best_ms(lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in weights])
        w_xt = best_ms(lambda xs=xs: [torch.mm(w, xs[w.shape[1]].t()).t() for w in weights])
        x_wt = best_ms(lambda xs=xs: [xs[w.shape[0]] @ w for w in transposed])
        print(f"{m:>5} {linear:>15.1f} {w_xt:>13.1f} {x_wt:>15.1f}")


if __name__ == "__main__":
    main()

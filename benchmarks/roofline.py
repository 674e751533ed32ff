"""This machine's roofline: fp32 matmul GFLOP/s and memory bandwidth, and the decode limits they imply.

    python benchmarks/roofline.py                       # SmolLM2-135M, 2 threads, 128 in / 128 out
    python benchmarks/roofline.py --params 1.24e9 --threads 4

Decode reads every weight once per step, whatever the batch: one sequence is bandwidth-bound at
BW / weight_bytes tokens/s, and a batch of B at B times that, until compute caps it at
FLOPS / (2 * params) tokens/s. A whole request (prefill + decode) costs 2 * params * (in + out) FLOPs
for `out` output tokens, which bounds output tokens/s at any batch size (attention FLOPs ignored,
small at these lengths). Takes ~10 s.
"""

import argparse
import time

import torch

# bytes per weight as stored: fp32, bf16, and llama.cpp's Q4_1 (32 weights in 20 bytes)
FORMATS = (("fp32", 4.0), ("bf16", 2.0), ("Q4_1", 20 / 32))


def best_time(fn, seconds: float) -> float:
    """Fastest of repeated calls within a time budget (after one warm-up call)."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(n: int, seconds: float) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=c), seconds) / 1e9


def bandwidth_gbs(mib: int, seconds: float) -> tuple[float, float]:
    """(copy GB/s counting read + write, sum GB/s counting the read) over a tensor of `mib` MiB."""
    src = torch.rand(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy = 2 * nbytes / best_time(lambda: dst.copy_(src), seconds) / 1e9
    read = nbytes / best_time(lambda: src.sum(), seconds) / 1e9
    return copy, read


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--params", type=float, default=134.5e6, help="model parameters (SmolLM2-135M)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--mib", type=int, default=256, help="tensor size for the bandwidth test")
    p.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    flops = matmul_gflops(args.matmul_n, args.seconds) * 1e9
    copy_bw, read_bw = bandwidth_gbs(args.mib, args.seconds)
    bw = read_bw * 1e9  # decode streams weights: reads dominate
    print(f"threads {args.threads}, torch {torch.__version__}")
    print(f"fp32 matmul {args.matmul_n}^3:  {flops / 1e9:8.1f} GFLOP/s")
    print(f"memory copy (r+w):     {copy_bw:8.1f} GB/s")
    print(f"memory read (sum):     {read_bw:8.1f} GB/s")

    params = args.params
    compute_tok_s = flops / (2 * params)
    per_req = 2 * params * (args.input_len + args.output_len)
    workload_tok_s = flops / per_req * args.output_len
    print(f"\nmodel: {params / 1e6:.1f} M parameters")
    print(f"compute limit, decode only:           {compute_tok_s:8.0f} tok/s (any batch)")
    print(
        f"compute limit, {args.input_len} in / {args.output_len} out requests: "
        f"{workload_tok_s:8.0f} output tok/s (prefill included)"
    )
    print(f"\n{'weights':<8}{'GB':>8}{'1-seq decode tok/s (BW)':>26}{'batch where compute binds':>28}")
    for name, bpp in FORMATS:
        wbytes = params * bpp
        one_seq = bw / wbytes
        print(f"{name:<8}{wbytes / 1e9:>8.3f}{one_seq:>26.0f}{compute_tok_s / one_seq:>28.1f}")


if __name__ == "__main__":
    main()

"""`xllm tune`: choose max_num_seqs, the per-step token budget and the memory split for a workload on this
machine, from a fitted model and a few real runs, and write them as a file `xllm up --config FILE` reads.

1. Profile: a reduced `xllm profile` grid around the workload's shape (a few prefill lengths, decode batches at
   the workload's context), fitted as shared/cost_model.py's step-cost model.
2. Choose by the model (xllm/tune/model.py): the largest batch whose predicted TPOT meets --tpot-slo-ms, whose
   running sequences' KV fits in --memory beside the weights and activations, and whose prefill the token
   budget carries; the budget is the largest that keeps a step with a prompt chunk within the target.
3. Verify (xllm/tune/measure.py): run the workload at the choice with its budget adapted online to the target,
   then at the same batch with the largest static budget (the model cannot tell the two apart); then, in the
   form that measured better, refit with the runs' steps, scale the model to the TPOT measured there if it is
   still off, and run the batch it names now. The final choice is the best run within the target.

Run it with the device, dtype and threads the workers will have; it prints predicted against measured numbers
and the constraint that binds.
"""

import argparse
import shlex
import sys
import time

import torch

from shared.cost_model import CostModel, fit, relative_errors
from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.system import DTYPES, available_memory, default_dtype
from xllm.profile import Profiler, positive
from xllm.tune.config import write_config
from xllm.tune.measure import Measured, Point, run_point
from xllm.tune.model import Limits, Memory, Prediction, Workload, blocks, choose, predict
from xllm.tune.report import print_choice, print_runs

CLOSE = 0.05  # a measured TPOT within this of the prediction: the model holds there


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xllm tune", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tpot-slo-ms", type=float, required=True, help="time per output token target (mean)")
    p.add_argument("--prompt-len", type=positive, default=128)
    p.add_argument("--output-len", type=positive, default=64)
    p.add_argument("--shared-prefix-len", type=int, default=0, help="prompt tokens that are one of the shared prefixes")
    p.add_argument("--num-prefixes", type=int, default=0, help="distinct shared prefixes, equally popular")
    p.add_argument(
        "--memory",
        type=positive,
        default=None,
        help="bytes for weights, activations and the KV pool "
        "(default: the weights + a tenth of the free memory, what a worker takes by default)",
    )
    p.add_argument("--kv-host-memory", type=int, default=0, help="the most bytes a second KV tier may take (0: none)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    p.add_argument("--num-threads", type=positive, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-num-seqs", type=positive, default=256, help="the largest batch to consider")
    p.add_argument("--max-num-batched-tokens", type=positive, default=4096, help="the largest token budget")
    p.add_argument("--min-num-batched-tokens", type=positive, default=64)
    p.add_argument("--runs", type=positive, default=3, help="real runs of the workload to verify with")
    p.add_argument("--requests", type=positive, default=None, help="requests a run (default: 2 x the batch, >= 16)")
    p.add_argument("--output", default="xllm-tuned.json")
    p.add_argument("--quick", action="store_true", help="a tiny profile and one short run: for tests")
    p.add_argument("--seed", type=int, default=0)
    return p


def memory_of(engine: LLMEngine, args: argparse.Namespace) -> Memory:
    """What the engine needs in bytes: its weights as loaded, KV per token, activations per batched token (the
    hidden states, q/k/v and MLP intermediates a layer holds at once) and per sampled sequence (fp32 logits)."""
    cfg = engine.model_config
    weights = weights_bytes(engine)
    per_token, per_seq = activation_bytes(cfg, engine.dtype)
    budget = args.memory or weights + int(0.1 * available_memory(engine.device))
    tier_in = engine.block_manager.tier.in_per_block if engine.block_manager.tier else None
    return Memory(
        budget,
        weights,
        ModelRunner.block_bytes(cfg, 1, engine.dtype),
        per_token,
        per_seq,
        engine.config.block_size,
        args.kv_host_memory,
        tier_in
        if tier_in is not None
        else copy_seconds(ModelRunner.block_bytes(cfg, engine.config.block_size, engine.dtype)),
    )


def weights_bytes(engine: LLMEngine) -> int:
    return sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()])


def activation_bytes(cfg, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes a step holds per batched token (hidden states, q/k/v, the MLP's intermediates) and per sampled
    sequence (fp32 logits and their probabilities)."""
    elem = torch.empty(0, dtype=dtype).element_size()
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return elem * (4 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size), 2 * 4 * cfg.vocab_size


def copy_seconds(nbytes: int) -> float:
    """Seconds to copy `nbytes` within this host's memory (the fastest of a few): a tier block's way up."""
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return best


def build_engine(args: argparse.Namespace, work: Workload, limits: Limits) -> LLMEngine:
    """An engine whose pool holds the profile's largest run and the largest batch considered (that --memory
    could hold: the runs hold back what a configuration does not have, xllm/tune/measure.py)."""
    ckpt = load_checkpoint(args.model)
    dtype = default_dtype(args.dtype, torch.device(args.device))
    size = EngineConfig().block_size
    block_bytes = ModelRunner.block_bytes(ckpt.config, size, dtype)
    context = work.prompt_len + work.output_len // 2
    largest = limits.max_num_seqs * blocks(work.prompt_len + work.output_len, size)
    if args.memory:
        largest = min(largest, args.memory // block_bytes)
    profiled = max(32 * blocks(context + 8, size), 8 * blocks(3 * context + 8, size))
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        num_threads=args.num_threads,
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        enable_prefix_caching=False,
        kv_cache_memory=(max(largest, profiled) + 16) * block_bytes,
    )
    return LLMEngine(config, ckpt)


def profile(engine: LLMEngine, work: Workload, limits: Limits, quick: bool, seed: int) -> Profiler:
    """The reduced grid: prefills around the prompt length, decode batches at the workload's context."""
    profiler, longest = Profiler(engine, seed), engine.max_model_len - work.output_len - 8
    p, context = min(work.prompt_len, longest), min(work.prompt_len + work.output_len // 2, longest)
    profiler.run(min(4, limits.max_num_seqs), min(64, p), 4, keep=False)  # warm-up
    lengths = (16, p) if quick else (32, p, min(4 * p, limits.max_num_batched_tokens, longest))
    for n in sorted(set(lengths)):
        profiler.prefill(n)
    batches = (1, 4) if quick else (1, 8, 32)
    runs = [(b, context) for b in batches] + ([] if quick else [(8, min(3 * context, longest))])
    for b, c in runs:
        b = min(b, limits.max_num_seqs)
        profiler.decode(b, c, -(-b * c // limits.max_num_batched_tokens) + (4 if quick else 12))
    return profiler


def scaled(cost: CostModel, factor: float) -> CostModel:
    return CostModel(*(value * factor for value in cost.to_dict().values()))


def verify(engine, cost, memory, work, limits, args, samples) -> tuple[list[tuple[Prediction, Measured]], CostModel]:
    """Real runs. First the model's choice, with its budget adapted online to the target, then the same batch with
    the largest static budget: the model prices a prompt the same in small chunks or in one, so only a measurement
    tells the two apart (a burst of prompts prefilled in one step while nothing decodes costs no TPOT). Then, in
    the form that measured better, the model is refitted with the runs' steps, scaled to the TPOT measured there
    when still off by more than CLOSE, and asked again, until it names a batch already run or the runs are spent."""
    runs: list[tuple[Prediction, Measured]] = []
    static = Limits(limits.max_num_seqs, limits.max_num_batched_tokens, limits.max_num_batched_tokens)

    def run(prediction: Prediction, slo_ms: float | None) -> Measured:
        blocks_held = prediction.kv_device // (memory.kv_per_token * memory.block_size)
        point = Point(prediction.max_num_seqs, prediction.max_num_batched_tokens, blocks_held, slo_ms)
        requests = args.requests or (4 if args.quick else max(8, 2 * prediction.max_num_seqs))
        measured = run_point(engine, point, work.prompt_len, work.output_len, requests, args.seed + len(runs))
        runs.append((prediction, measured))
        samples.extend(measured.steps)
        return measured

    first = choose(cost, memory, work, limits).best
    run(first, args.tpot_slo_ms)
    if args.quick or args.runs < 2:
        return runs, cost
    wide = predict(cost, memory, work, first.max_num_seqs, static)
    if wide is not None and wide.max_num_batched_tokens > first.max_num_batched_tokens:
        run(wide, None)
    while len(runs) < args.runs:
        form = best_run(runs, work) or min(runs, key=lambda r: r[1].tpot_s)
        slo_ms, form_limits = (args.tpot_slo_ms, limits) if form[1].point.step_slo_ms else (None, static)
        cost = fit(samples) or cost
        at = predict(cost, memory, work, form[1].point.max_num_seqs, form_limits)
        if at is not None and abs(form[1].tpot_s / at.tpot_s - 1) > CLOSE:
            cost = scaled(cost, form[1].tpot_s / at.tpot_s)
        again = choose(cost, memory, work, form_limits).best
        if any(m.point.max_num_seqs == again.max_num_seqs and m.point.step_slo_ms == slo_ms for _, m in runs):
            break
        run(again, slo_ms)
    return runs, cost


def best_run(runs: list[tuple[Prediction, Measured]], work: Workload) -> tuple[Prediction, Measured] | None:
    """The run of highest throughput within the target and without preemptions."""
    within = [(pr, m) for pr, m in runs if m.tpot_s <= work.tpot_slo_s and not m.preemptions]
    return max(within, key=lambda run: run[1].throughput) if within else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    work = Workload(
        args.prompt_len, args.output_len, args.tpot_slo_ms / 1000, args.shared_prefix_len, args.num_prefixes
    )
    limits = Limits(args.max_num_seqs, args.max_num_batched_tokens, args.min_num_batched_tokens)
    started = time.perf_counter()
    try:
        engine = build_engine(args, work, limits)
        memory = memory_of(engine, args)
        profiler = profile(engine, work, limits, args.quick, args.seed)
        samples = list(profiler.samples)
        cost = fit(samples)
        if cost is None:
            raise ValueError("too few steps to fit a cost model")
        choice = choose(cost, memory, work, limits)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"xllm tune: {e}", file=sys.stderr)
        return 2
    profiled = time.perf_counter() - started
    errors = sorted(relative_errors(cost, samples))
    print_choice(args, engine, memory, work, cost, choice, len(samples), profiled, errors[len(errors) // 2])
    runs, cost = verify(engine, cost, memory, work, limits, args, samples)
    final, step_slo_ms = final_choice(cost, memory, work, limits, runs)
    print_runs(runs, final, work, step_slo_ms)
    up = {
        "model": args.model,
        "mode": "colocated",
        "max_num_seqs": final.max_num_seqs,
        "max_num_batched_tokens": final.max_num_batched_tokens,
        "kv_cache_memory": final.kv_device,
        "kv_host_memory": final.kv_host or None,
        "step_slo_ms": step_slo_ms,
        "worker_threads": torch.get_num_threads(),
    }
    meta = {
        "model": args.model,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "num_threads": torch.get_num_threads(),
        "command": shlex.join(["xllm", "tune", *argv]),
    }
    measured = [
        {
            "max_num_seqs": m.point.max_num_seqs,
            "max_num_batched_tokens": m.point.max_num_batched_tokens,
            "step_slo_ms": m.point.step_slo_ms,
            "predicted_tpot_ms": pr.tpot_s * 1e3,
            "tpot_ms": m.tpot_s * 1e3,
            "predicted_tokens_per_s": pr.throughput,
            "tokens_per_s": m.throughput,
        }
        for pr, m in runs
    ]
    write_config(
        args.output,
        up,
        samples,
        meta,
        {"workload": vars(args), "binds": choice.binds, "runs": measured, "seconds": time.perf_counter() - started},
    )
    print(f"wrote {args.output} in {time.perf_counter() - started:.0f} s: xllm up --config {args.output}")
    engine.close()
    return 0


def final_choice(cost, memory, work, limits, runs) -> tuple[Prediction, float | None]:
    """The best run's configuration and TPOT target for its budget (None: static), else the refitted model's."""
    best = best_run(runs, work)
    if best is None:
        return choose(cost, memory, work, limits).best, work.tpot_slo_s * 1e3
    return best[0], best[1].point.step_slo_ms

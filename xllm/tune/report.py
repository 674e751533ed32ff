"""What `xllm tune` prints: the model's figures around its choice, the constraint that binds, and the real runs
against their predictions."""

import argparse

from shared.cost_model import CostModel
from xllm.tune.measure import Measured
from xllm.tune.model import Choice, Memory, Prediction, Workload

MIB = 1 << 20


def print_choice(
    args: argparse.Namespace,
    engine,
    memory: Memory,
    work: Workload,
    cost: CostModel,
    choice: Choice,
    steps: int,
    seconds: float,
    median_error: float,
) -> None:
    per_seq = memory.kv_per_token * (work.prompt_len + work.output_len)
    print(
        f"xllm tune: {args.model}  {engine.device} {str(engine.dtype).removeprefix('torch.')}  "
        f"threads {engine.config.num_threads or 'default'}; {work.prompt_len} in / {work.output_len} out, "
        f"TPOT target {work.tpot_slo_s * 1e3:g} ms; memory {memory.budget / MIB:.0f} MiB"
    )
    print(
        f"memory: weights {memory.weights / MIB:.0f} MiB, KV {memory.kv_per_token / 1024:.1f} KiB a token "
        f"({per_seq / MIB:.1f} MiB a sequence), activations {memory.act_per_token / 1024:.1f} KiB a batched token"
    )
    print(
        f"profile: {steps} steps in {seconds:.0f} s; step ms = {cost.step * 1e3:.3f} + {cost.seq * 1e3:.4f} x seqs"
        f" + {cost.token * 1e3:.4f} x tokens + {cost.attention * 1e6:.4f}/1000 x attention"
        f" + {cost.context * 1e6:.4f}/1000 x decode context; median error {median_error:.1%}"
    )
    best = choice.best.max_num_seqs
    shown = sorted({1, best // 2, best - 1, best, best + 1, 2 * best} & {p.max_num_seqs for p in choice.predictions})
    print(f"  {'B':>4} {'T':>6} {'TPOT ms':>8} {'worst ms':>9} {'tok/s':>7} {'KV MiB':>7} {'fits':>5}")
    for pr in (p for p in choice.predictions if p.max_num_seqs in shown):
        fits = "yes" if pr.feasible(work.tpot_slo_s) else "no"
        print(
            f"  {pr.max_num_seqs:>4} {pr.max_num_batched_tokens:>6} {pr.tpot_s * 1e3:>8.1f} "
            f"{pr.worst_step_s * 1e3:>9.1f} {pr.throughput:>7.1f} {pr.kv_device / MIB:>7.0f} {fits:>5}"
        )
    print(f"model's choice: B={best}, T={choice.best.max_num_batched_tokens}; binds: {choice.explanation}")


def print_runs(
    runs: list[tuple[Prediction, Measured]], final: Prediction, work: Workload, step_slo_ms: float | None
) -> None:
    print("verified by real runs (predicted -> measured):")
    for pr, m in runs:
        within = "within" if m.tpot_s <= work.tpot_slo_s else "OVER"
        print(
            f"  B={m.point.max_num_seqs:<4} T={m.point.max_num_batched_tokens:<5}"
            f"{' adapted' if m.point.step_slo_ms else ' static '} TPOT {pr.tpot_s * 1e3:.1f} -> "
            f"{m.tpot_s * 1e3:.1f} ms ({within} target)   {pr.throughput:.1f} -> {m.throughput:.1f} tok/s   "
            f"{m.preemptions} preemptions, {m.seconds:.1f} s"
        )
    print(
        f"chosen: max_num_seqs {final.max_num_seqs}, max_num_batched_tokens {final.max_num_batched_tokens}"
        + (f" (adapted online under step_slo_ms {step_slo_ms:g})" if step_slo_ms else " (static)")
        + f"; memory: KV pool {final.kv_device / MIB:.0f} "
        f"MiB, second tier {final.kv_host / MIB:.0f} MiB, activations {final.activations / MIB:.0f} MiB"
        + (f", prefix hit {final.prefix_hit:.0%}" if final.prefix_hit else "")
    )

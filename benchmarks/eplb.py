"""Expert load balancing (EPLB) on vs off, `--expert-parallel 2` on this host, one run.

No real MoE model ships offline, so this builds a synthetic Qwen3-MoE (random weights, SmolLM2's
tokenizer) and skews its router: every MoE layer's router gets a bias that sends most tokens to a few
"hot" experts, and the hot set moves each phase. Two engines, one after the other, serve the same
workload (a fixed number of requests in the engine, topped up as they finish): EPLB off (the default
placement, redundant slots holding experts 0, 1, ...) and on; then, for reference, one engine with no
expert parallelism at all. Per phase: throughput in tokens through
the model (prompt + generated) per second, and the imbalance (max / mean routed tokens per rank, mean
over layers) at its end; then the rebalances and the time each layer's move stalled the engine.

    PYTHONPATH=. python benchmarks/eplb.py [--phases 3 --steps 100 --seqs 32 --prompt-len 256 --output-len 8]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.moe import SparseMoeBlock
from shared.engine.sampling_params import SamplingParams
from shared.model_files import smollm2_gguf
from shared.tokenizer import Tokenizer

EXPERTS, BIAS = 16, 4.0
# Each phase's hot experts. The default placement puts experts 0-8 on rank 0 and 9-15 plus copies of 0
# and 1 on rank 1 (2 redundant slots): the first skew lands on rank 0 alone, the next on rank 1.
HOT = [[2, 3], [12, 13], [5, 6], [9, 10]]


def build_model(out: Path, hidden: int, layers: int, intermediate: int) -> Path:
    import transformers as tf

    tok = Tokenizer.from_gguf(smollm2_gguf())
    config = tf.Qwen3MoeConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        moe_intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(config).save_pretrained(out)
    tok.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return out


def skew(engine: LLMEngine, phase: int) -> list[int]:
    """Bias every router toward this phase's hot experts."""
    hot = HOT[phase % len(HOT)]
    for block in (m for m in engine.model.modules() if isinstance(m, SparseMoeBlock)):
        bias = torch.zeros(EXPERTS)
        bias[hot] = BIAS
        block.gate.bias = torch.nn.Parameter(bias, requires_grad=False)
    return hot


def run(model: Path, eplb: bool, args, ranks: int = 2) -> list[dict]:
    config = EngineConfig(
        model=str(model),
        expert_parallel=ranks,
        num_redundant_experts=args.redundant if ranks > 1 else 0,
        enable_eplb=eplb,
        eplb_interval_steps=args.interval,
        num_threads=1,
        kv_cache_memory=512 << 20,
        max_num_seqs=args.seqs,
    )
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    phases, n, seen = [], 0, set()
    try:
        for phase in range(args.phases):
            hot = skew(engine, phase)
            tokens, started = 0, time.perf_counter()
            for _ in range(args.steps):
                while len(engine.requests) < args.seqs:
                    engine.add_request(f"r{n}", [1000 + (n * 7 + j) % 30000 for j in range(args.prompt_len)], params)
                    n += 1
                for out in engine.step():
                    if out.request_id not in seen:  # its prompt went through the model
                        seen.add(out.request_id)
                        tokens += out.prompt_tokens
                    tokens += sum(len(d.token_ids) for d in out.outputs)
            seconds = time.perf_counter() - started
            stats = engine.stats()
            layers = stats.get("eplb_imbalance", {0: 1.0})
            phases.append(
                dict(
                    hot=hot,
                    tok_s=tokens / seconds,
                    imbalance=sum(layers.values()) / len(layers),
                    rebalances=stats.get("eplb_rebalances", 0),
                )
            )
        balancer = engine.expert_balancer
        phases.append(
            dict(move_seconds=balancer.move_seconds if balancer else 0.0, moves=stats.get("eplb_rebalances", 0))
        )
    finally:
        engine.close()
    return phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="engine steps per phase")
    parser.add_argument("--seqs", type=int, default=32, help="requests in the engine at once")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--redundant", type=int, default=2)
    parser.add_argument("--interval", type=int, default=8, help="--eplb-interval-steps")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.hidden, args.layers, args.intermediate)
        off, on, single = run(model, False, args), run(model, True, args), run(model, False, args, ranks=1)
    print(
        f"synthetic Qwen3-MoE: {EXPERTS} experts (top-2), {args.layers} layers, hidden {args.hidden}, "
        f"experts of {args.intermediate}; {args.redundant} redundant slots; {args.seqs} requests of "
        f"{args.prompt_len} + {args.output_len} tokens at a time"
    )
    print(
        "| phase | hot experts | EP 2, EPLB off tok/s | EPLB on tok/s | on/off | imbalance off | imbalance on "
        "| rebalances (on, so far) | no EP tok/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (a, b, c) in enumerate(zip(off[:-1], on[:-1], single[:-1], strict=True)):
        print(
            f"| {i} | {a['hot']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {b['tok_s'] / a['tok_s']:.2f}x "
            f"| {a['imbalance']:.2f} | {b['imbalance']:.2f} | {b['rebalances']} | {c['tok_s']:.1f} |"
        )
    total_off, total_on, total_single = (sum(p["tok_s"] for p in r[:-1]) / args.phases for r in (off, on, single))
    moves = on[-1]["moves"]
    stall = on[-1]["move_seconds"] / moves * 1000 if moves else 0.0
    print(
        f"mean of phases: off {total_off:.1f} tok/s, on {total_on:.1f} tok/s ({total_on / total_off:.2f}x); "
        f"{moves} layer moves, {stall:.1f} ms each on average; no expert parallelism {total_single:.1f} tok/s"
    )


if __name__ == "__main__":
    main()

"""`xllm bench engine`: our engine vs transformers `generate`, same weights, same run, side by side.

Each batch size runs B prompts of `--input-len` random token ids and generates exactly
`--output-len` tokens each (EOS ignored), greedy; output tokens/s includes the prefill, for both.
transformers is a test/bench dependency (`pip install -e '.[test]'`).
"""

import argparse
import random
import time
from collections import Counter

import torch

from shared.engine.config import (
    SPECULATIVE_METHODS,
    EngineConfig,
    speculation_problem,
)
from shared.engine.layers import Linear
from shared.engine.llm import LLM
from shared.engine.loader import load_checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.quant import plan
from shared.engine.sampling_params import SamplingParams
from shared.model_files import resolve_model
from xllm.bench import speculative
from xllm.cli import add_quantization_flag


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = speculation_problem(args.speculative, args.draft_model)
    if problem:
        parser().error(problem)
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    keep_blocks, _ = plan(args.quantization, torch.device("cpu"), torch.float32)
    ckpt = load_checkpoint(args.model, keep_blocks=keep_blocks)
    if args.speculative != "none":
        return speculative.run(
            ckpt,
            args.model,
            args.speculative,
            args.num_speculative_tokens,
            args.threads,
            args.rounds,
            args.seed,
            args.draft_model,
        )
    rng = random.Random(args.seed)
    vocab = ckpt.config.vocab_size
    token_bytes = ModelRunner.block_bytes(ckpt.config, 1, torch.float32)
    kv_bytes = token_bytes * (args.input_len + args.output_len + 32) * max(batch_sizes)
    config = EngineConfig(
        model=args.model,
        num_threads=args.threads,
        kv_cache_memory=kv_bytes,
        max_num_seqs=max(batch_sizes),
        enable_prefix_caching=False,
        quantization=args.quantization,
    )
    llm = LLM(config, ckpt)
    hf = None if args.no_hf else load_hf(args.model)
    print(
        f"model {ckpt.config.name}  weights {weight_formats(llm)}, fp32 activations  threads {args.threads}  "
        f"{args.input_len} in / {args.output_len} out (EOS ignored), greedy; output tok/s, prefill included"
    )
    print(f"{'batch':>5} {'xllm tok/s':>11} {'hf tok/s':>9} {'ratio':>6}")
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([[rng.randrange(vocab) for _ in range(16)]], SamplingParams(max_tokens=4))  # warm-up
    for batch in batch_sizes:
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(batch)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        ours = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
        theirs = hf_generate(hf, prompts, args.output_len) if hf is not None else float("nan")
        print(f"{batch:>5} {ours:>11.1f} {theirs:>9.1f} {ours / theirs:>5.2f}x", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm bench engine", description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    add_quantization_flag(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        default="none",
        help="instead: this speculative method against none (xllm/bench/speculative.py)",
    )
    parser.add_argument("--num-speculative-tokens", type=int, default=5)
    parser.add_argument("--draft-model", default=None, help="with --speculative draft: the draft model")
    parser.add_argument("--rounds", type=int, default=3, help="with --speculative: rounds of fresh prompts")
    return parser


def weight_formats(llm: LLM) -> str:
    """The formats the engine's projections run in, e.g. 'q4_1 x210, q8_0 x1'."""
    formats = Counter(
        m.quantized.format if m.quantized is not None else "fp32"
        for m in llm.engine.model.modules()
        if isinstance(m, Linear)
    )
    return ", ".join(f"{name} x{count}" for name, count in formats.most_common())


def load_hf(model: str):
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], output_len: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * len(prompts) / elapsed

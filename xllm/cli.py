"""The `xllm` command.

xllm up [...]                 start everything locally (the README's serve command)
xllm serve SERVICE [...]      run one service against an existing NATS (what compose runs)
xllm generate --prompt TEXT   in-process generation; prints the completion only
xllm bench engine | serve     benchmarks
xllm profile [...]            measure this engine's step costs here, for the router (--cost-profile FILE)
xllm tune --tpot-slo-ms MS    choose max_num_seqs, the token budget and the memory split here (xllm up --config FILE)
xllm simulate --profile FILE  simulate a cluster of N instances under a policy, priced by a profile
xllm submit jobs.jsonl        an offline batch job over NATS
"""

import argparse
import importlib
import sys

SERVICES = ("gateway", "router", "kvcache", "encoder", "prefill", "decode", "mixed", "colocated")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "up":
        from shared.config import load_config
        from shared.logging import configure_logging
        from xllm.tune.config import up_defaults
        from xllm.up import UpConfig, up

        config = load_config(UpConfig, rest, prog="xllm up", defaults=up_defaults(rest))
        configure_logging("xllm-up", config.log_level)
        return up(config)
    if command == "serve":
        return serve(rest)
    if command == "generate":
        return generate(rest)
    if command == "bench":
        return bench(rest)
    if command == "profile":
        from xllm.profile import main as profile

        return profile(rest)
    if command == "tune":
        from xllm.tune.cli import main as tune

        return tune(rest)
    if command == "simulate":
        from xllm.simulate.cli import main as simulate

        return simulate(rest)
    if command == "submit":
        from xllm.submit import main as submit

        return submit(rest)
    print(f"xllm: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


def serve(argv: list[str]) -> int:
    if not argv or argv[0] not in SERVICES:
        print(
            f"usage: xllm serve {{{','.join(SERVICES)}}} [flags]  (flags: xllm serve SERVICE --help)", file=sys.stderr
        )
        return 2
    return importlib.import_module(f"services.{argv[0]}.__main__").main(argv[1:]) or 0


def generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xllm generate", description="generate text in-process")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    add_quantization_flag(parser)
    add_speculative_flags(parser)
    args = parser.parse_args(argv)

    from shared.engine.config import EngineConfig
    from shared.engine.errors import InvalidRequestError
    from shared.engine.llm import LLM
    from shared.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        llm = LLM(
            EngineConfig(
                model=args.model,
                device=args.device,
                num_threads=args.threads,
                quantization=args.quantization,
                kv_cache_memory=256 << 20,
                speculative=args.speculative,
                num_speculative_tokens=args.num_speculative_tokens,
                draft_length=args.draft_length,
                draft_model=args.draft_model,
            )
        )
        (completion,) = llm.generate([args.prompt], params, chat=args.chat)
    except (InvalidRequestError, FileNotFoundError, ValueError) as e:
        print(f"xllm generate: {e}", file=sys.stderr)
        return 2
    print(completion.outputs[0].text)
    return 0


def add_quantization_flag(parser: argparse.ArgumentParser) -> None:
    from shared.engine.config import QUANTIZATION_HELP, QUANTIZATIONS

    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="auto", help=QUANTIZATION_HELP)


def add_speculative_flags(parser: argparse.ArgumentParser) -> None:
    from shared.engine.config import DRAFT_LENGTHS, SPECULATIVE_METHODS

    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        default="none",
        help="speculative decoding: draft tokens by n-gram lookup, suffix decoding or a draft model",
    )
    parser.add_argument(
        "--draft-model", default=None, help="with --speculative draft: a smaller model with the same tokenizer"
    )
    parser.add_argument(
        "--num-speculative-tokens", type=int, default=5, help="the most draft tokens a sequence scores per step"
    )
    parser.add_argument(
        "--draft-length",
        choices=DRAFT_LENGTHS,
        default="adaptive",
        help="adaptive: as many as pay (a measured cost model); fixed: all that is proposed",
    )


def bench(argv: list[str]) -> int:
    if not argv or argv[0] not in ("engine", "serve"):
        print("usage: xllm bench {engine,serve} [flags]", file=sys.stderr)
        return 2
    if argv[0] == "engine":
        from xllm.bench.engine import main as bench_engine

        return bench_engine(argv[1:])
    from xllm.bench.serve import main as bench_serve

    return bench_serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

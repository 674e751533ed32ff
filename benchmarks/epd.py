"""Images through the service: encoding on the prefill worker (EP -> D) against a separate encoder
(E -> P -> D, and the router's per-request choice), side by side.

    PYTHONPATH=. python benchmarks/epd.py [--num-prompts 24] [--concurrency 4] [--image-repeat 0.5]

The model is a LLaVA of realistic shape with random weights (nothing can be downloaded here): a ViT-S/16
vision tower at 224x224 (196 image tokens) and a SmolLM2-135M-shaped language model, which is enough for
timings. The three systems run at once (each: a prefill and a decode worker, plus an encoder for the EPD
ones, every process one torch thread); the same requests (one image each, a share of them repeated) go
to each in turn at the given concurrency. Prints TTFT and end-to-end latency, throughput, and where the
images were encoded, how long an image took there and how many the encoder's cache served.
"""

import argparse
import asyncio
import random
import tempfile
from pathlib import Path

import numpy as np

from xllm.bench.client import Target
from xllm.bench.local_system import System, start_system, stop_system
from xllm.bench.runner import LoadPoint, run_load
from xllm.bench.workloads import WorkloadSpec, generate

LAYOUTS = {
    "EP->D": ["--encode", "never"],
    "E->P->D": ["--encoder", "1", "--encode", "always"],
    "auto": ["--encoder", "1", "--encode", "auto"],
}


def build_model(out: Path) -> Path:
    from shared.model_files import smollm2_gguf
    from shared.tokenizer import Tokenizer
    from tests.engine.llava_model import build_tiny_llava

    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=16)
    text = dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return build_tiny_llava(out, Tokenizer.from_gguf(smollm2_gguf()), vision, text, image_size=224)


def instance_figures(system: System) -> dict:
    """Images encoded, seconds spent and cache hits, by role (from the registry's heartbeats)."""
    figures: dict[str, dict] = {}
    for i in system.instances():
        c, f = i["counters"], figures.setdefault(i["role"], {"images": 0, "seconds": 0.0, "hits": 0})
        f["images"] += c.get("images_encoded", 0)
        f["seconds"] += c.get("image_encode_seconds", 0.0)
        f["hits"] += c.get("image_cache_hits", 0)
    return figures


async def measure(systems: dict[str, System], model: str, args: argparse.Namespace) -> dict[str, dict]:
    spec = WorkloadSpec(
        "synthetic", 32, args.output_len, images_per_request=1, image_repeat=args.image_repeat, image_size=224
    )
    requests = generate(spec, args.num_prompts, seed=0, salt_rng=random.Random(1))
    warmup = generate(spec, 2, seed=1, salt_rng=random.Random(2))
    point = LoadPoint(max_concurrency=args.concurrency)
    results = {}
    for name, system in systems.items():
        target = Target(system.url, model, ignore_eos=True)
        run = await run_load(target, requests, point, 0, warmup, progress=False)
        ok = [r for r in run.results if r.ok]
        assert len(ok) == len(requests), [r.error for r in run.results if not r.ok]
        await asyncio.sleep(2.5)  # two heartbeats: the counters include the last requests
        results[name] = {
            "ttft": np.array([r.ttft for r in ok]),
            "e2e": np.array([r.e2e for r in ok]),
            "tokens": sum(r.output_tokens for r in ok),
            "duration": run.duration_s,
            "figures": instance_figures(system),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--image-repeat", type=float, default=0.5)
    args = parser.parse_args()
    model = str(build_model(Path(tempfile.mkdtemp(prefix="xllm-epd-model-"))))
    systems = {}
    try:
        for name, extra in LAYOUTS.items():
            state = Path(tempfile.mkdtemp(prefix="xllm-epd-"))
            systems[name] = start_system(
                state, "--model", model, "--worker-threads", "1", "--kv-cache-fraction", "0.05", *extra
            )
        results = asyncio.run(measure(systems, model, args))
    finally:
        for system in systems.values():
            stop_system(system.proc)
    report(results, args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"LLaVA (ViT-S/16 224px, SmolLM2-135M shape, random weights), {args.num_prompts} requests, one image each "
        f"({args.image_repeat:.0%} from a pool of 8), 32 words + {args.output_len} tokens, "
        f"concurrency {args.concurrency}"
    )
    base = results["EP->D"]["tokens"] / results["EP->D"]["duration"]
    header = f"{'layout':<9} {'TTFT p50':>9} {'TTFT p90':>9} {'e2e p50':>8} {'tok/s':>6} {'vs EP->D':>8}"
    print(f"{header}  images encoded (ms each, cache hits)")
    for name, r in results.items():
        rate = r["tokens"] / r["duration"]
        where = ", ".join(
            f"{role} {f['images']} ({1000 * f['seconds'] / max(1, f['images']):.0f} ms, {f['hits']} hits)"
            for role, f in r["figures"].items()
            if f["images"] or f["hits"]
        )
        ttft, e2e = r["ttft"], r["e2e"]
        latency = f"{np.median(ttft):>8.2f}s {np.percentile(ttft, 90):>8.2f}s {np.median(e2e):>7.2f}s"
        print(f"{name:<9} {latency} {rate:>6.1f} {rate / base:>7.2f}x  {where}")


if __name__ == "__main__":
    main()

"""Greedy agreement with llama.cpp on the same GGUF (issue 12): each prompt's first N greedy tokens from
llama-server, and from this engine with the file's blocks kept (--quantization auto, the integer kernels)
and dequantized to fp32 (none). The prompt goes to both as token ids, so the tokenizers cannot differ.

    .venv/bin/python benchmarks/greedy_agreement.py [--tokens 64]

Needs .llama.cpp/bin/llama-server (benchmarks/build_llama_server.sh); not run in CI. Two quantized
implementations round differently (llama.cpp quantizes activations to Q8_1, sums in its own order), and
greedy decoding turns a near-tie at one position into a different continuation, so the table reports how
far each pair agrees: identical continuations, and the mean number of tokens before the first difference.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.engine.llm import LLM
from shared.engine.sampling_params import SamplingParams
from shared.model_files import smollm2_gguf
from xllm.natsd import free_port

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "The chess club meets on",
    "Water boils at a temperature of",
    "Here is a short poem about the sea:",
    "To install the package, run",
    "The three primary colors are",
    "import numpy as np\n\ndef normalize(x):",
    "Photosynthesis is the process by which",
    "Q: What is the largest planet in the solar system?\nA:",
]


def llama_server_tokens(prompts: list[list[int]], tokens: int) -> list[list[int]]:
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(port), "SLOTS": "1", "CTX_PER_SLOT": "1024"}
    server = subprocess.Popen(
        [str(REPO / "benchmarks/run_llama_server.sh")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        outputs = []
        for ids in prompts:
            body = {
                "prompt": ids,
                "n_predict": tokens,
                "temperature": 0,
                "top_k": 1,
                "samplers": ["top_k"],
                "ignore_eos": True,
                "cache_prompt": False,
                "return_tokens": True,
            }
            request = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(request, timeout=300) as r:
                outputs.append(json.loads(r.read())["tokens"])
        return outputs
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)  # a benchmark polling a server it started, not a test
    raise RuntimeError(f"llama-server not healthy within {timeout} s")


def engine_tokens(prompts: list[list[int]], tokens: int, quantization: str) -> tuple[list[list[int]], list[list]]:
    """Each prompt's greedy tokens, and at each position the top two (token, logprob) pairs."""
    llm = LLM(model=str(smollm2_gguf()), quantization=quantization, num_threads=2)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=2)
    outputs = [c.outputs[0] for c in llm.generate(prompts, params)]
    return [o.token_ids for o in outputs], [[top for _, top in o.logprobs] for o in outputs]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    args = parser.parse_args()
    llm = LLM(model=str(smollm2_gguf()), quantization="none", num_threads=2)
    prompts = [llm.encode(p) for p in PROMPTS]
    del llm
    auto, _ = engine_tokens(prompts, args.tokens, "auto")
    none, fp32_top2 = engine_tokens(prompts, args.tokens, "none")
    runs = {"llama.cpp": llama_server_tokens(prompts, args.tokens), "xllm auto": auto, "xllm none": none}
    print(f"{len(PROMPTS)} prompts, {args.tokens} greedy tokens each, SmolLM2-135M-Instruct Q4_1 GGUF")
    print(f"{'pair':<26} {'identical':>9} {'mean tokens before':>19}   at each first difference: the fp32")
    print(f"{'':<26} {'':>9} {'the first difference':>19}   run's top two? (largest logprob gap)")
    for a, b in (("xllm auto", "llama.cpp"), ("xllm none", "llama.cpp"), ("xllm auto", "xllm none")):
        prefixes = [common_prefix(x, y) for x, y in zip(runs[a], runs[b], strict=True)]
        identical = sum(p == args.tokens for p in prefixes)
        # Where the pair first differs (their prefixes equal the fp32 run's, or nearly), both tokens among
        # the fp32 run's two most likely there, and how far apart: a near-tie, or a real disagreement.
        near, checked, gap = 0, 0, 0.0
        for i, k in enumerate(prefixes):
            if k == args.tokens or common_prefix(runs[a][i], none[i]) < k:
                continue  # identical, or the fp32 run had left this prefix already: no fp32 view of it
            checked += 1
            top = dict(fp32_top2[i][k])
            chosen = {runs[a][i][k], runs[b][i][k]}
            if chosen <= top.keys():
                near += 1
                gap = max(gap, abs(top[runs[a][i][k]] - top[runs[b][i][k]]))
        print(
            f"{a + ' vs ' + b:<26} {identical:>5} / {len(prefixes):<3} {sum(prefixes) / len(prefixes):>19.1f}"
            f"   {near} of {checked} ({gap:.3f})"
        )
        print(f"{'':<26} per prompt: {prefixes}")


if __name__ == "__main__":
    main()

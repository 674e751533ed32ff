"""What to send: prompts and output lengths for each workload, generated locally from a seed.

Prompts are random words from `words.WORDS` (one word ~ one token, see words.py), so an input length
of N means N words. Each prompt starts with a salt: a few words drawn from a *fresh* random source
(`salt_rng`, OS entropy unless a test passes a seeded one), so no server can answer a request from a
prompt cache it would not have in real use -- not even when the same seed is run twice. The seeded part
(lengths and the rest of the words) is repeatable. The shared-prefix workload salts each group's
shared system prompt once per run, so the first request of a group misses the cache and the rest hit.
"""

import random
from dataclasses import dataclass, field

import numpy as np

from xllm.bench.images import request_images
from xllm.bench.words import WORDS

SALT_WORDS = 6  # 456**6 ~ 9e15 different salts: enough to never collide within a run
WORKLOADS = ("synthetic", "chat", "shared-prefix", "code-edit", "offline")


@dataclass
class BenchRequest:
    prompt: str  # the user text (starts with its salt)
    max_tokens: int
    input_len: int  # intended prompt tokens, approximate (words); usage gives the real count
    system: str | None = None  # shared-prefix workload: the group's shared system prompt
    group: int | None = None
    images: list[str] = field(default_factory=list)  # data: URLs sent before the text (chat endpoint)


@dataclass
class WorkloadSpec:
    kind: str = "synthetic"
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # synthetic / shared-prefix: lengths uniform in L*(1 +- range_ratio)
    prefix_groups: int = 4  # shared-prefix: number of groups G
    prefix_len: int = 512  # shared-prefix: tokens in each group's shared system prompt
    chat_sigma_in: float = 0.9  # chat: lognormal spread of input lengths (long tail, like ShareGPT)
    chat_sigma_out: float = 0.6  # chat: lognormal spread of output lengths
    images_per_request: int = 0  # any workload: images in each request (a multimodal model's)
    image_repeat: float = 0.0  # share of those images drawn from a small pool that repeats
    image_size: int = 336  # pixels a side


def random_words(n: int, rng: np.random.Generator) -> list[str]:
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]


def salted_text(n_words: int, rng: np.random.Generator, salt_rng: random.Random) -> str:
    """n_words words: the first SALT_WORDS (or fewer) from salt_rng, the rest from the seeded rng."""
    salt = [salt_rng.choice(WORDS) for _ in range(min(SALT_WORDS, n_words))]
    return " ".join(salt + random_words(n_words - len(salt), rng))


def uniform_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    if range_ratio <= 0:
        return np.full(n, mean, dtype=np.int64)
    lo = max(1, round(mean * (1 - range_ratio)))
    hi = max(lo, round(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def lognormal_lengths(mean: int, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed lengths with the given mean, clipped to [4, 4*mean]."""
    mu = np.log(mean) - sigma**2 / 2  # so that E[X] = mean
    x = rng.lognormal(mu, sigma, size=n)
    return np.clip(np.round(x), 4, max(4, 4 * mean)).astype(np.int64)


def generate(spec: WorkloadSpec, n: int, seed: int, salt_rng: random.Random | None = None) -> list[BenchRequest]:
    """n requests of the given workload, with `spec.images_per_request` images each."""
    salt_rng = salt_rng or random.SystemRandom()
    requests = _generate(spec, n, seed, salt_rng)
    if spec.images_per_request:
        rng = np.random.default_rng([seed, 1])
        urls = request_images(n, spec.images_per_request, spec.image_repeat, spec.image_size, rng, salt_rng)
        for request, images in zip(requests, urls):
            request.images = images
    return requests


def _generate(spec: WorkloadSpec, n: int, seed: int, salt_rng: random.Random) -> list[BenchRequest]:
    """The offline workload uses the synthetic lengths."""
    rng = np.random.default_rng(seed)
    if spec.kind in ("synthetic", "offline"):
        ins = uniform_lengths(spec.input_len, spec.range_ratio, n, rng)
        outs = uniform_lengths(spec.output_len, spec.range_ratio, n, rng)
    elif spec.kind == "chat":
        ins = lognormal_lengths(spec.input_len, spec.chat_sigma_in, n, rng)
        outs = lognormal_lengths(spec.output_len, spec.chat_sigma_out, n, rng)
    elif spec.kind == "shared-prefix":
        return shared_prefix(spec, n, rng, salt_rng)
    elif spec.kind == "code-edit":
        prompts = [
            " ".join(salt_rng.choice(WORDS) for _ in range(SALT_WORDS)) + "\n" + code_edit_prompt(rng) for _ in range(n)
        ]
        return [BenchRequest(p, spec.output_len, len(p.split())) for p in prompts]
    else:
        raise ValueError(f"unknown workload {spec.kind!r}; choose one of {', '.join(WORKLOADS)}")
    return [BenchRequest(salted_text(int(i), rng, salt_rng), int(o), int(i)) for i, o in zip(ins, outs)]


def code_edit_prompt(rng: np.random.Generator) -> str:
    """A prompt holding a code block that the answer reproduces with one edit: what speculative decoding
    by n-gram or suffix lookup is for."""
    names = random_words(7, rng)
    functions = [
        f"def {a}_{b}(values):\n    total = 0\n    for value in values:\n        total += value * "
        f"{rng.integers(2, 9)}\n    return total\n"
        for a, b in zip(names[:6:2], names[1:6:2])
    ]
    old, new = f"{names[0]}_{names[1]}", f"{names[0]}_{names[6]}"
    return (
        f"Here is some Python code:\n```python\n{''.join(functions)}```\nRewrite the code above with the "
        f"function `{old}` renamed to `{new}`. Reply with the whole code only."
    )


def shared_prefix(spec: WorkloadSpec, n: int, rng: np.random.Generator, salt_rng: random.Random) -> list[BenchRequest]:
    """G groups; each request = its group's shared system prompt + its own salted question."""
    groups = max(1, spec.prefix_groups)
    systems = [salted_text(spec.prefix_len, rng, salt_rng) for _ in range(groups)]
    ins = uniform_lengths(spec.input_len, spec.range_ratio, n, rng)
    outs = uniform_lengths(spec.output_len, spec.range_ratio, n, rng)
    order = rng.permutation(n)  # interleave the groups in arrival order
    out = []
    for k in order:
        g = int(k) % groups
        prompt = salted_text(int(ins[k]), rng, salt_rng)
        out.append(BenchRequest(prompt, int(outs[k]), spec.prefix_len + int(ins[k]), systems[g], g))
    return out

"""What an engine step costs, in seconds, fitted to measured steps: the model the router predicts TTFT and TPOT
with (xLLM's: TTFT quadratic in the prompt length, TPOT linear in batch and batch x context).

    step_seconds = c_step + c_seq * sequences + c_token * tokens
                   + c_attention * sum over prompt chunks of (new tokens x context) + c_context * decode context

A prefill of n tokens alone is then c_step + c_seq + c_token * n + c_attention * n^2; a decode step of B
sequences holding L tokens in all is c_step + (c_seq + c_token) * B + c_context * L. Attention is priced
apart for the two because it is not the same work: a prompt chunk's is compute (every new token against
every earlier one), a decode's is reading the KV it holds. Every coefficient is kept >= 0 (the best
non-negative fit over subsets of the features), weighted by relative error so short decode steps count as
much as long prefills.

`StepCosts` fits online: samples from `xllm profile` (a saved file) as the prior, plus the engine's latest
steps. Torch-free: the router uses the same model on the coefficients workers report in their heartbeats.
"""

import itertools
import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FEATURES = ("step", "seq", "token", "attention", "context")
MIN_SAMPLES = 8  # steps seen before a fit is trusted (a prefill instance batches many prompts a step)
REFIT_EVERY = 32  # steps between refits
WINDOW = 512  # recent steps the online fit keeps


@dataclass
class StepSample:
    """One engine step: sequences scheduled, tokens scored, sum of new tokens x context over its prompt chunks,
    the tokens its decodes hold, and its seconds."""

    seqs: int
    tokens: int
    attention: int
    context: int
    seconds: float

    def features(self) -> list[float]:
        return [1.0, float(self.seqs), float(self.tokens), float(self.attention), float(self.context)]


@dataclass
class CostModel:
    """Seconds per unit of each feature (all >= 0)."""

    step: float = 0.0
    seq: float = 0.0
    token: float = 0.0
    attention: float = 0.0
    context: float = 0.0

    def step_seconds(self, seqs: int, tokens: int, attention: int, context: int = 0) -> float:
        return self.step + self.seq * seqs + self.token * tokens + self.attention * attention + self.context * context

    def predict(self, sample: StepSample) -> float:
        return self.step_seconds(sample.seqs, sample.tokens, sample.attention, sample.context)

    def prefill_work(self, tokens: int, context: int = 0) -> float:
        """Seconds a prompt chunk of `tokens` after `context` cached ones adds to the steps it rides in."""
        return self.token * tokens + self.attention * tokens * (context + tokens)

    def decode_step(self, seqs: int, context_tokens: int) -> float:
        """Seconds of a step decoding `seqs` sequences that hold `context_tokens` tokens in all."""
        return self.step_seconds(seqs, seqs, 0, context_tokens) if seqs else 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel | None":
        """None when `d` does not carry every coefficient (an instance that has not measured enough yet)."""
        try:
            return cls(**{name: float(d[name]) for name in FEATURES})
        except (KeyError, TypeError, ValueError):
            return None


def fit(samples: list[StepSample]) -> CostModel | None:
    """The non-negative least-squares fit (relative error) over every subset of the features; None for
    fewer than MIN_SAMPLES samples."""
    if len(samples) < MIN_SAMPLES:
        return None
    seconds = np.array([s.seconds for s in samples], dtype=np.float64)
    weight = 1.0 / np.maximum(seconds, 1e-6)
    x = np.array([s.features() for s in samples], dtype=np.float64) * weight[:, None]
    y = seconds * weight
    best, best_error = None, math.inf
    for size in range(1, len(FEATURES) + 1):
        for subset in itertools.combinations(range(len(FEATURES)), size):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if (coef < 0).any():
                continue
            error = float(np.sum((x[:, subset] @ coef - y) ** 2))
            if error < best_error - 1e-12:
                full = [0.0] * len(FEATURES)
                for i, c in zip(subset, coef):
                    full[i] = float(c)
                best, best_error = CostModel(*full), error
    return best


def relative_errors(model: CostModel, samples: list[StepSample]) -> list[float]:
    """|predicted - measured| / measured, per sample."""
    return [abs(model.predict(s) - s.seconds) / s.seconds for s in samples]


class StepCosts:
    """The online fit: the profile's samples (if any) plus the last WINDOW steps, refitted every REFIT_EVERY."""

    def __init__(self, prior: list[StepSample] | None = None):
        self.prior = list(prior or [])
        self.recent: deque[StepSample] = deque(maxlen=WINDOW)
        self.model = fit(self.prior)
        self._since_fit = 0

    def seed(self, samples: list[StepSample]) -> None:
        """Samples that stay in every fit, as a profile's do: the engine's calibration (shared/engine/calibrate.py),
        whose steps these were, so the recent window starts empty again."""
        self.prior += samples
        self.recent.clear()
        self.model = fit(self.prior) or self.model
        self._since_fit = 0

    def observe(self, sample: StepSample) -> None:
        self.recent.append(sample)
        self._since_fit += 1
        if self._since_fit >= REFIT_EVERY or (self.model is None and len(self.recent) >= MIN_SAMPLES):
            self.model = fit([*self.prior, *self.recent]) or self.model
            self._since_fit = 0


def save_profile(path: str | Path, samples: list[StepSample], meta: dict) -> None:
    model = fit(samples)
    data = {**meta, "fit": model.to_dict() if model else None, "samples": [asdict(s) for s in samples]}
    Path(path).write_text(json.dumps(data, indent=1))


def load_profile(path: str | Path) -> tuple[list[StepSample], dict]:
    """The samples of a file `xllm profile` wrote, and the rest of what it says (its fit, model, device...)."""
    data = json.loads(Path(path).read_text())
    samples = [StepSample(**s) for s in data.pop("samples")]
    return samples, data

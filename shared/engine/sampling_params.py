"""Sampling parameters with OpenAI / vLLM meanings, validated once when a request is added."""

import math
from dataclasses import dataclass, field, fields

from shared.engine.errors import InvalidRequestError

# Below this temperature a row is greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by a smaller
# one overflows to inf and the softmax to NaN.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; vLLM's default max_logprobs, for completions too
LOGIT_BIAS_LIMIT = 100  # OpenAI and vLLM: a bias is in [-100, 100]
_UNSET = object()


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k = also return the k most likely tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # token id -> added to its logit before sampling; int keys survive msgpack (strict_map_key=False)
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field (its `param`), with the rule and the value."""
        self._validate_sampling()
        self._validate_lengths()
        self._validate_stops()
        self._validate_logit_bias()
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise self._bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise self._bad(name, "must be a boolean")

    def _validate_sampling(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise self._bad("n", "must be an integer >= 1")
        # OpenAI's range: past 2 the distribution is near uniform and a reply runs to the context limit
        if not _is_num(self.temperature) or not 0 <= self.temperature <= 2:
            raise self._bad("temperature", "must be in [0, 2]")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise self._bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise self._bad("top_k", "must be -1 (disabled) or an integer >= 1")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise self._bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise self._bad(name, "must be in [-2, 2]")
        # vLLM and HF document only > 0 (1 = off); no upper bound to pick, so none beyond finiteness
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise self._bad("repetition_penalty", "must be a number > 0")
        if self.seed is not None and not _is_int(self.seed):
            raise self._bad("seed", "must be an integer")

    def _validate_lengths(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise self._bad("max_tokens", "must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise self._bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise self._bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")

    def _validate_stops(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise self._bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) for t in self.stop_token_ids):
            raise self._bad("stop_token_ids", "must be a list of integers")

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise self._bad("logit_bias", "must be a map of token ids to biases")
        for token, bias in self.logit_bias.items():
            if not _is_int(token):
                raise self._bad("logit_bias", "keys must be integer token ids", token)
            if not _is_num(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                why = f"[{token}] must be a number in [-{LOGIT_BIAS_LIMIT}, {LOGIT_BIAS_LIMIT}]"
                raise InvalidRequestError(f"logit_bias{why}, got {_short(bias)}", "logit_bias")

    def _bad(self, param: str, why: str, value: object = _UNSET) -> InvalidRequestError:
        value = getattr(self, param) if value is _UNSET else value
        return InvalidRequestError(f"{param} {why}, got {_short(value)}", param)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {sorted(unknown)}")
        return cls(**d)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    """A real number (not a bool), finite: NaN passes no range check by failing every comparison."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float's range: no sampling rule wants one
        return False


def _short(value: object, limit: int = 40) -> str:
    """repr, cut: a 400-digit integer or a long list should not fill the error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

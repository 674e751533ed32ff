"""OpenAI request bodies -> one internal request: validated SamplingParams and prompt token ids.
This module holds what both APIs share; chat.py and completion.py parse their own bodies with it.

Tokenization (chat template included) happens there, once per request, in the gateway and nowhere
else. Workers get token ids only, so (1) the router can hash prompt tokens into KV block hashes for
prefix-aware routing before any worker sees the request, (2) usage.prompt_tokens is exact and known
up front, and (3) a prompt that does not fit the context is refused at the door with a 400.

Value ranges are SamplingParams' rules (shared/engine/sampling_params.py); these modules only check
what SamplingParams cannot know: JSON shape, OpenAI-only fields, vocabulary and context limits. The
type of every field read is checked, so a body decoded from msgpack (a batch job's) is parsed as
safely as JSON: a NaN, an integer key or bytes is refused with a 400 naming the field.
"""

from dataclasses import dataclass, field, fields
from typing import Any

from services.gateway.multimodal import VisionInfo
from shared.engine.errors import InvalidRequestError
from shared.engine.sampling_params import SamplingParams
from shared.errors import ApiError, invalid

# Sampling fields taken from the body under the same name (OpenAI, plus vLLM's extras).
SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
MAX_STOP = 4  # OpenAI: "up to 4 sequences" (vLLM sets no limit)
_INT64 = (-(2**63), 2**63)


@dataclass
class ModelInfo:
    """What the gateway knows of the served model (no weights)."""

    name: str  # the id clients send as "model"
    max_model_len: int  # context length, prompt + completion
    vocab_size: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # model's sampling defaults
    vision: VisionInfo | None = None  # how the model takes images; None: text only


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completion"
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: str | None = None  # completions with echo=true: the prompt text, put before each choice
    images: list[dict[str, Any]] = field(default_factory=list)  # ImageRef dicts


def check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if name is None:  # like vLLM: the one served model
        return
    if not isinstance(name, str):
        raise invalid("model must be a string", "model")
    if name != model.name:
        raise ApiError(
            404,
            f"The model `{name}` does not exist; this server serves `{model.name}`.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = flag(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return stream, flag(options, "include_usage", False, "stream_options.include_usage")


def refuse(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, False, [], {}):
            raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")


def check_openai_fields(body: dict) -> None:
    """Rules of OpenAI's API that are not sampling rules of the engine."""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f"user must be a string, got {type(user).__name__}", "user", "invalid_type")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise invalid(f"stop may hold at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    fmt = body.get("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        raise invalid(
            f"response_format {fmt['type']!r} is not supported by this server (no guided decoding); "
            "only {'type': 'text'}",
            "response_format",
            "unsupported_parameter",
        )
    raise invalid("response_format must be {'type': 'text'}, the only format supported", "response_format")


def check_length(body: dict, name: str) -> None:
    value = body.get(name)
    if not is_int(value) or value < 1:
        raise invalid(f"{name} must be an integer >= 1, got {value!r}", name)


def sampling(
    body: dict, model: ModelInfo, max_n: int, logprobs: Any, max_name: str, renames: dict[str, str]
) -> SamplingParams:
    """SamplingParams from the body over the model's defaults; its errors renamed to OpenAI names."""
    known = {f.name for f in fields(SamplingParams)} - {"n", "max_tokens", "logprobs"}
    values = {k: v for k, v in model.generation_defaults.items() if k in known}
    values.update({k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None})
    values["logit_bias"] = _logit_bias(body.get("logit_bias"), model)
    values["max_tokens"] = body.get(max_name)
    values["logprobs"] = logprobs
    renames = {"max_tokens": max_name, **renames}
    try:
        params = SamplingParams(**values)
    except InvalidRequestError as e:
        raise _renamed(e, renames) from None
    if params.n > max_n:
        raise invalid(f"n must be <= {max_n}, got {params.n}", "n")
    for name, value in params.to_dict().items():  # msgpack and torch take 64-bit integers at most
        if any(is_int(v) and not _INT64[0] <= v < _INT64[1] for v in (value if isinstance(value, list) else [value])):
            raise invalid(f"{renames.get(name, name)} is out of range", renames.get(name, name))
    bad = next((t for t in params.stop_token_ids if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        msg = f"stop_token_ids: {bad} is not a token id of this model (0..{model.vocab_size - 1})"
        raise invalid(msg, "stop_token_ids")
    return params


def _logit_bias(value: Any, model: ModelInfo) -> dict[int, Any]:
    """JSON's {"token id": bias} -> {token id: bias}; the biases are SamplingParams' to check."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("logit_bias must be an object mapping token ids to biases in [-100, 100]", "logit_bias")
    out = {}
    for key, bias in value.items():
        # "5", not 5 (JSON keys are text), "-5", "5.0", "٥" or 5000 digits (past int()'s digit limit; no
        # vocabulary is that large)
        text = key if isinstance(key, str) else None
        token = int(text) if text and text.isascii() and text.isdigit() and len(text) <= 18 else None
        if token is None or token >= model.vocab_size:
            shown = repr(key) if text is None or len(text) <= 24 else repr(text[:21] + "...")
            msg = f"logit_bias: {shown} is not a token id of this model (0..{model.vocab_size - 1})"
            raise invalid(msg, "logit_bias")
        out[token] = bias
    return out


def _renamed(e: InvalidRequestError, renames: dict[str, str]) -> ApiError:
    """SamplingParams' error under the name the client used (e.g. top_logprobs for logprobs)."""
    param = renames.get(e.param, e.param) if e.param else None
    message = e.message.replace(e.param, param, 1) if e.param and param else e.message
    return invalid(message, param)


def fit_context(ids: list[int], params: SamplingParams, model: ModelInfo, what: str, max_name: str) -> None:
    """max_tokens defaults to what is left of the context (like vLLM); prompt + max_tokens must fit."""
    ctx, p, m = model.max_model_len, len(ids), params.max_tokens
    if m is None:
        if p >= ctx:
            raise invalid(
                f"This model's maximum context length is {ctx} tokens, but the {what} has {p} tokens, "
                "which leaves no room for the completion.",
                what,
                "context_length_exceeded",
            )
        params.max_tokens = ctx - p
        try:
            params.validate()  # min_tokens <= max_tokens
        except InvalidRequestError as e:
            raise _renamed(e, {"max_tokens": max_name}) from None
    elif p + m > ctx:
        raise invalid(
            f"This model's maximum context length is {ctx} tokens. However, you requested {p + m} "
            f"tokens ({p} in the {what}, {m} in the completion). Please reduce the length of the "
            f"{what} or of the completion.",
            max_name,
            "context_length_exceeded",
        )


def flag(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{param or name} must be a boolean, got {value!r}", param or name, "invalid_type")
    return value


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

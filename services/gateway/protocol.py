"""OpenAI request bodies -> one internal request: validated SamplingParams and prompt token ids.

Tokenization (chat template included) happens here, once per request, in the gateway and nowhere else.
Workers get token ids only, so (1) the router can hash prompt tokens into KV block hashes for
prefix-aware routing before any worker sees the request, (2) usage.prompt_tokens is exact and known
up front, and (3) a prompt that does not fit the context is refused at the door with a 400.

Value ranges are SamplingParams' rules (shared/engine/sampling_params.py); this module only checks
what SamplingParams cannot know: JSON shape, OpenAI-only fields, vocabulary and context limits.
"""

from dataclasses import dataclass, field, fields
from typing import Any

import structlog

from shared.engine.errors import InvalidRequestError
from shared.engine.sampling_params import SamplingParams
from shared.errors import ApiError, invalid

log = structlog.get_logger("xllm.gateway")

ROLES = ("system", "developer", "user", "assistant", "tool")
# Sampling fields taken from the body under the same name (OpenAI, plus vLLM's extras).
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output",
)  # fmt: skip
# Accepted only at their "off" value: refusing beats silently ignoring them.
CHAT_UNSUPPORTED = (
    "tools", "functions", "function_call", "audio", "prediction", "use_beam_search",
    "prompt_logprobs", "guided_json", "guided_regex", "guided_choice",
)  # fmt: skip
COMPLETION_UNSUPPORTED = (
    "suffix", "use_beam_search", "prompt_logprobs", "guided_json", "guided_regex", "guided_choice",
)  # fmt: skip
MAX_STOP = 4  # OpenAI: "up to 4 sequences" (vLLM sets no limit)
_INT64 = (-(2**63), 2**63)


@dataclass
class ModelInfo:
    """What the gateway knows of the served model (no weights)."""

    name: str  # the id clients send as "model"
    max_model_len: int  # context length, prompt + completion
    vocab_size: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # model's sampling defaults


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completion"
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: str | None = None  # completions with echo=true: the prompt text, put before each choice


def parse_chat(body: dict[str, Any], model: ModelInfo, tokenizer: Any, max_n: int = 16) -> ParsedRequest:
    """A /v1/chat/completions body -> ParsedRequest (raises ApiError)."""
    _check_model(body, model)
    stream, include_usage = _stream_flags(body)
    _refuse(body, CHAT_UNSUPPORTED)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise invalid("tool_choice is not supported by this server", "tool_choice", "unsupported_parameter")
    _check_openai_fields(body)
    messages = _messages(body.get("messages"))
    want_logprobs = _flag(body, "logprobs", False)
    top = body.get("top_logprobs")
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (0 if top is None else top) if want_logprobs else None
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_name == "max_completion_tokens" and body.get("max_tokens") is not None:
        _check_length(body, "max_tokens")  # the deprecated alias is ignored, but a bad one is still refused
    params = _sampling(body, model, max_n, logprobs, max_name, {"logprobs": "top_logprobs"})
    add_generation_prompt = _flag(body, "add_generation_prompt", True)
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a Jinja template may reject a conversation (e.g. roles must alternate)
        log.info("chat_template_rejected", error=repr(e))
        raise invalid(f"the model's chat template rejected the messages: {e}", "messages") from None
    _fit_context(ids, params, model, "messages", max_name)
    return ParsedRequest("chat", list(ids), params, stream, include_usage)


def parse_completion(
    body: dict[str, Any], model: ModelInfo, tokenizer: Any, max_n: int = 16
) -> ParsedRequest:
    """A /v1/completions body -> ParsedRequest (raises ApiError)."""
    _check_model(body, model)
    stream, include_usage = _stream_flags(body)
    _refuse(body, COMPLETION_UNSUPPORTED)
    _check_openai_fields(body)
    echo = _flag(body, "echo", False)
    # logprobs: an integer in [0, 20] (SamplingParams), not OpenAI's legacy [0, 5]: vLLM accepts up to
    # its max_logprobs (20 by default) here, and clients written against vLLM ask for more than 5
    logprobs = body.get("logprobs")
    if echo and logprobs is not None:
        raise invalid("echo together with logprobs is not supported", "echo", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and not _is_int(best_of):
        raise invalid(f"best_of must be an integer, got {best_of!r}", "best_of", "invalid_type")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise invalid("best_of other than n is not supported", "best_of", "unsupported_parameter")
    params = _sampling(body, model, max_n, logprobs, "max_tokens", {})
    ids, text = _prompt(body.get("prompt"), tokenizer, model)
    _fit_context(ids, params, model, "prompt", "max_tokens")
    return ParsedRequest("completion", ids, params, stream, include_usage, text if echo else None)


def _sampling(
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
        if any(_is_int(v) and not _INT64[0] <= v < _INT64[1] for v in _as_list(value)):
            raise invalid(f"{renames.get(name, name)} is out of range", renames.get(name, name))
    bad = next((t for t in params.stop_token_ids if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise invalid(
            f"stop_token_ids: {bad} is not a token id of this model (0..{model.vocab_size - 1})",
            "stop_token_ids",
        )
    return params


def _check_openai_fields(body: dict) -> None:
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


def _check_length(body: dict, name: str) -> None:
    value = body.get(name)
    if not _is_int(value) or value < 1:
        raise invalid(f"{name} must be an integer >= 1, got {value!r}", name)


def _logit_bias(value: Any, model: ModelInfo) -> dict[int, Any]:
    """JSON's {"token id": bias} -> {token id: bias}; the biases are SamplingParams' to check."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("logit_bias must be an object mapping token ids to biases in [-100, 100]", "logit_bias")
    out = {}
    for key, bias in value.items():
        # "5", not "-5", "5.0", "٥" or 5000 digits (past int()'s digit limit; no vocabulary is that large)
        token = int(key) if key.isascii() and key.isdigit() and len(key) <= 18 else None
        if token is None or token >= model.vocab_size:
            shown = repr(key) if len(key) <= 24 else repr(key[:21] + "...")
            msg = f"logit_bias: {shown} is not a token id of this model (0..{model.vocab_size - 1})"
            raise invalid(msg, "logit_bias")
        out[token] = bias
    return out


def _renamed(e: InvalidRequestError, renames: dict[str, str]) -> ApiError:
    """SamplingParams' error under the name the client used (e.g. top_logprobs for logprobs)."""
    param = renames.get(e.param, e.param) if e.param else None
    message = e.message.replace(e.param, param, 1) if e.param and param else e.message
    return invalid(message, param)


def _fit_context(ids: list[int], params: SamplingParams, model: ModelInfo, what: str, max_name: str) -> None:
    """max_tokens defaults to what is left of the context (like vLLM); prompt + max_tokens must fit."""
    ctx, p, m = model.max_model_len, len(ids), params.max_tokens
    if m is None:
        if p >= ctx:
            raise invalid(
                f"This model's maximum context length is {ctx} tokens, but the {what} has {p} "
                "tokens, which leaves no room for the completion.",
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


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise invalid("messages must be a non-empty array of {role, content} objects", "messages")
    if not value:
        raise invalid("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        content = _content(m.get("content"), role, f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _content(content: Any, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or an array of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            msg = f"{where}[{j}]: content part {kind!r} is not supported; only 'text'"
            raise invalid(msg, f"{where}[{j}]")
        text = part.get(part["type"])
        if not isinstance(text, str):
            raise invalid(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
        texts.append(text)
    return "\n".join(texts)  # vLLM's "string" content format


def _prompt(prompt: Any, tokenizer: Any, model: ModelInfo) -> tuple[list[int], str | None]:
    """(token ids, prompt text) of a completions prompt: a string, [string] or token ids ([ids] too)."""
    text = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        text, ids = prompt, list(tokenizer.encode(prompt))
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = prompt
        bad = next((t for t in ids if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            msg = f"prompt: {bad} is not a token id of this model (0..{model.vocab_size - 1})"
            raise invalid(msg, "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise invalid("batched prompts are not supported: send one prompt per request", "prompt")
    else:
        raise invalid("prompt must be a string, an array of one string, or an array of token ids", "prompt")
    if not ids:
        raise invalid("prompt must not be empty", "prompt")
    return ids, text if text is not None else tokenizer.decode(ids)


def _check_model(body: dict, model: ModelInfo) -> None:
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


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return stream, _flag(options, "include_usage", False, "stream_options.include_usage")


def _flag(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{param or name} must be a boolean, got {value!r}", param or name, "invalid_type")
    return value


def _refuse(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, False, [], {}):
            raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x]

"""A /v1/chat/completions body -> ParsedRequest: the messages rendered by the model's chat template and
tokenized, here and nowhere else (see protocol.py for why)."""

from typing import Any

import structlog

from services.gateway import protocol
from services.gateway.multimodal import PreparedImage, place_images
from services.gateway.protocol import ModelInfo, ParsedRequest
from shared.errors import invalid

log = structlog.get_logger("xllm.gateway")

ROLES = ("system", "developer", "user", "assistant", "tool")
# Accepted only at their "off" value: refusing beats silently ignoring them.
UNSUPPORTED = (
    "tools",
    "functions",
    "function_call",
    "audio",
    "prediction",
    "use_beam_search",
    "prompt_logprobs",
    "guided_json",
    "guided_regex",
    "guided_choice",
)


def parse_chat(
    body: dict[str, Any], model: ModelInfo, tokenizer: Any, max_n: int = 16, images: list[PreparedImage] = ()
) -> ParsedRequest:
    """A /v1/chat/completions body -> ParsedRequest (raises ApiError). `images`: the body's images, loaded
    (multimodal.load_images)."""
    protocol.check_model(body, model)
    stream, include_usage = protocol.stream_flags(body)
    protocol.refuse(body, UNSUPPORTED)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise invalid("tool_choice is not supported by this server", "tool_choice", "unsupported_parameter")
    protocol.check_openai_fields(body)
    messages = _messages(body.get("messages"), model.vision is not None)
    want_logprobs = protocol.flag(body, "logprobs", False)
    top = body.get("top_logprobs")
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (0 if top is None else top) if want_logprobs else None
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_name == "max_completion_tokens" and body.get("max_tokens") is not None:
        protocol.check_length(body, "max_tokens")  # the deprecated alias is ignored, but a bad one is still refused
    params = protocol.sampling(body, model, max_n, logprobs, max_name, {"logprobs": "top_logprobs"})
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt=protocol.flag(body, "add_generation_prompt", True))
    except Exception as e:  # a Jinja template may reject a conversation (e.g. roles must alternate)
        log.info("chat_template_rejected", error=repr(e))
        raise invalid(f"the model's chat template rejected the messages: {e}", "messages") from None
    ids, image_refs = place_images(list(ids), list(images), model.vision)
    protocol.fit_context(ids, params, model, "messages", max_name)
    return ParsedRequest("chat", ids, params, stream, include_usage, images=image_refs)


def _messages(value: Any, multimodal: bool) -> list[dict[str, Any]]:
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
        content = _content(m.get("content"), role, f"{where}.content", multimodal)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _content(content: Any, role: str, where: str, multimodal: bool) -> str | list[dict[str, str]]:
    """A text model's templates take a string; a multimodal model's take a list of parts, an image as
    {"type": "image"} where the template writes the image token (transformers' convention)."""
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if multimodal else content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or an array of content parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "image_url" and multimodal:  # loaded already: see multimodal.load_images
            parts.append({"type": "image"})
            continue
        if kind not in ("text", "refusal"):
            supported = "'text' and 'image_url'" if multimodal else "'text'"
            raise invalid(f"{where}[{j}]: content part {kind!r} is not supported; only {supported}", f"{where}[{j}]")
        text = part.get(kind)
        if not isinstance(text, str):
            raise invalid(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
        parts.append({"type": "text", "text": text})
    if multimodal:
        return parts
    return "\n".join(p["text"] for p in parts)  # vLLM's "string" content format

"""A /v1/completions body -> ParsedRequest: one prompt, as text (tokenized here) or as token ids."""

from typing import Any

from services.gateway import protocol
from services.gateway.protocol import ModelInfo, ParsedRequest
from shared.errors import invalid

# Accepted only at their "off" value: refusing beats silently ignoring them.
UNSUPPORTED = ("suffix", "use_beam_search", "prompt_logprobs", "guided_json", "guided_regex", "guided_choice")


def parse_completion(body: dict[str, Any], model: ModelInfo, tokenizer: Any, max_n: int = 16) -> ParsedRequest:
    """A /v1/completions body -> ParsedRequest (raises ApiError)."""
    protocol.check_model(body, model)
    stream, include_usage = protocol.stream_flags(body)
    protocol.refuse(body, UNSUPPORTED)
    protocol.check_openai_fields(body)
    echo = protocol.flag(body, "echo", False)
    # logprobs: an integer in [0, 20] (SamplingParams), not OpenAI's legacy [0, 5]: vLLM accepts up to
    # its max_logprobs (20 by default) here, and clients written against vLLM ask for more than 5
    logprobs = body.get("logprobs")
    if echo and logprobs is not None:
        raise invalid("echo together with logprobs is not supported", "echo", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and not protocol.is_int(best_of):
        raise invalid(f"best_of must be an integer, got {best_of!r}", "best_of", "invalid_type")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise invalid("best_of other than n is not supported", "best_of", "unsupported_parameter")
    params = protocol.sampling(body, model, max_n, logprobs, "max_tokens", {})
    ids, text = _prompt(body.get("prompt"), tokenizer, model)
    protocol.fit_context(ids, params, model, "prompt", "max_tokens")
    return ParsedRequest("completion", ids, params, stream, include_usage, text if echo else None)


def _prompt(prompt: Any, tokenizer: Any, model: ModelInfo) -> tuple[list[int], str | None]:
    """(token ids, prompt text) of a completions prompt: a string, [string] or token ids ([ids] too)."""
    text = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        text, ids = prompt, list(tokenizer.encode(prompt))
    elif isinstance(prompt, list) and prompt and all(protocol.is_int(t) for t in prompt):
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

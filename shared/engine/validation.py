"""Whether an engine can run a request: checks against limits fixed when the engine was built (vocabulary,
context length, KV pool, `n`, how the model takes images). Callers at a boundary (the worker for the bus,
`LLM` in-process) ask before `add_request`; the engine trusts what it is then given."""

from typing import TYPE_CHECKING

from shared.engine.errors import InvalidRequestError
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shared.engine.llm_engine import LLMEngine


def validate_request(
    engine: "LLMEngine", prompt_token_ids: list[int], params: SamplingParams, images: list[ImageInput]
) -> None:
    """Raise InvalidRequestError naming the field (`params` checked themselves when they were made)."""
    if not prompt_token_ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if images and engine.image_encoder is None:
        raise InvalidRequestError(f"model {engine.model_config.name!r} does not take images", "messages")
    if engine.image_encoder is not None:
        engine.image_encoder.check(prompt_token_ids, list(images))
    vocab = engine.model_config.vocab_size
    if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
    max_tokens = params.max_tokens or 1
    if len(prompt_token_ids) + max_tokens > engine.max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {engine.max_model_len} tokens, but the request "
            f"has {len(prompt_token_ids)} prompt tokens and asks for {max_tokens} more",
            "max_tokens",
        )
    if params.n > engine.config.max_num_seqs:
        raise InvalidRequestError(f"n must be <= {engine.config.max_num_seqs}", "n")
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"{name} must hold token ids in [0, {vocab})", name)
    num_blocks = engine.block_manager.num_blocks
    need = -(-(len(prompt_token_ids) + max_tokens) // engine.config.block_size)
    if need > num_blocks:
        raise InvalidRequestError(f"the request needs {need} KV blocks; the cache has {num_blocks}", "max_tokens")

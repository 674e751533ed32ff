"""LLaVA in the engine: greedy tokens equal transformers' for the same images and prompt (chunked prefill
splitting an image, several images, batched with text), images in the prefix cache, and refusals."""

import numpy as np
import pytest
import torch

from services.gateway.multimodal import PreparedImage, place_images
from shared.engine.errors import InvalidRequestError
from shared.engine.loader import load_checkpoint
from shared.engine.multimodal import ImageInput
from shared.images import ImageProcessorConfig, content_hash, prepare
from tests.engine.helpers import greedy, make_engine
from tests.engine.llava_model import PROCESSOR, hf_greedy_with_images, random_image

SYSTEM = "You are a careful assistant. You look at every picture closely before you answer any question."


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_checkpoint(str(tiny_llava_dir))


@pytest.fixture(scope="module")
def hf_llava(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()


def chat_prompt(ckpt, text: str, seeds: list[int]) -> tuple[list[int], list[ImageInput], list]:
    """A user turn with images then text, as the gateway builds it: ids, ImageInputs and the PIL images."""
    from services.gateway.multimodal import VisionInfo

    pictures = [random_image(seed) for seed in seeds]
    processor = ImageProcessorConfig.from_dict(PROCESSOR)
    crops = [prepare(p, processor) for p in pictures]
    parts = [{"type": "image"} for _ in seeds] + [{"type": "text", "text": text}]
    system = [{"type": "text", "text": SYSTEM}]
    ids = ckpt.tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": parts}])
    vision = VisionInfo(ckpt.config.image_token_id, ckpt.config.image_tokens, processor)
    ids, refs = place_images(ids, [PreparedImage(c, content_hash(c)) for c in crops], vision)
    return ids, [ImageInput.from_wire(r) for r in refs], pictures


def run(engine, requests: dict) -> dict[str, list[int]]:
    for rid, (ids, images, params) in requests.items():
        engine.validate(ids, params, images)
        engine.add_request(rid, ids, params, images=images)
    tokens = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("chunk", [2048, 24])  # 24: prefill chunks split the images
def test_llava_greedy_equals_transformers(llava, hf_llava, chunk):
    engine = make_engine(llava, max_num_batched_tokens=chunk)
    one = chat_prompt(llava, "What is in this picture?", [1])
    two = chat_prompt(llava, "Compare these.", [2, 3])
    text = chat_prompt(llava, "Just text, no picture.", [])
    params = greedy(12)
    got = run(engine, {"one": (*one[:2], params), "two": (*two[:2], params), "text": (*text[:2], params)})
    for name, (ids, _, pictures) in {"one": one, "two": two, "text": text}.items():
        assert got[name] == hf_greedy_with_images(hf_llava, ids, pictures, 12), name


def test_the_image_changes_the_output(llava):
    """Guards the comparison above: were images ignored, two pictures would give the same tokens."""
    engine = make_engine(llava)
    a, b = chat_prompt(llava, "Describe it.", [4]), chat_prompt(llava, "Describe it.", [5])
    got = run(engine, {"a": (*a[:2], greedy(12)), "b": (*b[:2], greedy(12))})
    assert got["a"] != got["b"]


def test_a_repeated_image_hits_the_prefix_cache_and_is_not_encoded_again(llava):
    engine = make_engine(llava)
    ids, images, _ = chat_prompt(llava, "What is in this picture?", [6])
    first = run(engine, {"a": (ids, images, greedy(4))})
    assert engine.image_encoder.images_encoded == 1
    again_ids, again_images, _ = chat_prompt(llava, "What is in this picture?", [6])
    again = run(engine, {"b": (again_ids, again_images, greedy(4))})
    assert again == {"b": first["a"]}
    assert engine.image_encoder.images_encoded == 1  # its blocks came from the cache: no encoding at all
    assert engine.block_manager.prefix_hits >= (images[0].offset + images[0].length) // 16


def test_another_image_at_the_same_place_does_not_hit_the_cache(llava):
    engine = make_engine(llava)
    ids, images, _ = chat_prompt(llava, "What is in this picture?", [7])
    run(engine, {"a": (ids, images, greedy(2))})
    hits = engine.block_manager.prefix_hits
    other_ids, other_images, _ = chat_prompt(llava, "What is in this picture?", [8])
    assert other_ids == ids  # the same tokens: only the image's content tells them apart
    run(engine, {"b": (other_ids, other_images, greedy(2))})
    first_image_block = other_images[0].offset // 16
    assert engine.block_manager.prefix_hits - hits == first_image_block  # the text before it only
    assert engine.image_encoder.images_encoded == 2


def test_engine_refuses_images_that_do_not_fit_the_prompt(llava, tiny_model_dir):
    engine = make_engine(llava)
    ids, images, _ = chat_prompt(llava, "Hi", [9])
    params = greedy(2)
    with pytest.raises(InvalidRequestError, match="placeholder"):
        engine.validate(ids, params, [])  # placeholders without their image
    shifted = ImageInput(images[0].offset + 1, images[0].length, images[0].hash, images[0].pixels)
    with pytest.raises(InvalidRequestError):
        engine.validate(ids, params, [shifted])
    small = ImageInput(images[0].offset, images[0].length, images[0].hash, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InvalidRequestError, match="takes"):
        engine.validate(ids, params, [small])
    forged = ImageInput(images[0].offset, images[0].length, "0" * 64, images[0].pixels)
    with pytest.raises(InvalidRequestError, match="hash"):
        engine.validate(ids, params, [forged])  # it would serve another image's cached embeddings
    text_engine = make_engine(load_checkpoint(str(tiny_model_dir("llama"))))
    with pytest.raises(InvalidRequestError, match="does not take images"):
        text_engine.validate([1, 2, 3], params, images)


def test_a_hub_llava_config_that_spells_only_what_differs_from_llama():
    """llava-1.5-7b-hf's config.json: a partial text_config (transformers' LlamaConfig fills the rest)."""
    from shared.model_files import config_from_hf

    raw = {
        "model_type": "llava",
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 1024},
        "text_config": {
            "model_type": "llama",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05,
            "vocab_size": 32064,
        },
    }
    config = config_from_hf(raw)
    assert (config.architecture, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        "llama",
        4096,
        32,
        32064,
    )
    assert (config.image_token_id, config.image_tokens) == (32000, 576)
    full = config_from_hf({**raw, "vision_feature_select_strategy": "full"})
    assert full.image_tokens == 577
    with pytest.raises(ValueError, match="vision tower"):
        config_from_hf({**raw, "vision_config": {"model_type": "qwen2_vl"}})


def encoded_per_step(engine, ids, images, n: int) -> tuple[list[int], list[int]]:
    """Images encoded at each step of one request, and its tokens."""
    engine.validate(ids, greedy(n), images)
    engine.add_request("r", ids, greedy(n), images=images)
    per_step, tokens = [], []
    while engine.has_unfinished_requests():
        before = engine.image_encoder.images_encoded
        for out in engine.step():
            tokens += out.outputs[0].token_ids
        per_step.append(engine.image_encoder.images_encoded - before)
    return per_step, tokens


def test_an_encoder_budget_spreads_a_prompts_images_over_steps_and_keeps_the_output(llava):
    ids, images, _ = chat_prompt(llava, "Compare these.", [12, 13])
    unbounded, expected = encoded_per_step(make_engine(llava), ids, images, 8)
    assert unbounded[0] == 2  # both in the first step
    ids, images, _ = chat_prompt(llava, "Compare these.", [12, 13])
    per_step, tokens = encoded_per_step(make_engine(llava, max_encoder_tokens=16), ids, images, 8)
    assert per_step[:2] == [1, 1] and sum(per_step) == 2  # one image (16 tokens) a step
    assert tokens == expected

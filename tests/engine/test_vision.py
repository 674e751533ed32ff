"""LLaVA's vision side against transformers: `shared.images` (prepare + normalize) equals its PIL image processors,
and `LlavaVisionEncoder` loaded from a saved tiny random checkpoint equals `get_image_features`."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from shared.engine.vision import LlavaVisionEncoder
from shared.images import ImageProcessorConfig, content_hash, normalize, prepare
from shared.llava_config import llava_image_tokens

CLIP_PROCESSOR = {  # llava-1.5's preprocessor_config.json, at a small size
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 30},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 28, "width": 28},
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "processor_class": "LlavaProcessor",
}
SIGLIP_PROCESSOR = {  # llava-interleave's, at a small size
    "image_processor_type": "SiglipImageProcessor",
    "do_resize": True,
    "size": {"height": 30, "width": 30},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def pictures() -> list[Image.Image]:
    """Random images: landscape, portrait, large, grayscale, RGBA with varied alpha, a palette with transparency."""
    rng = np.random.default_rng(5)

    def rgb(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    gray = Image.fromarray(rng.integers(0, 256, (45, 64), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (90, 40, 4), dtype=np.uint8))
    palette = rgb(33, 41).convert("P")
    palette.info["transparency"] = 7
    return [rgb(50, 37), rgb(37, 50), rgb(300, 200), rgb(28, 28), gray, rgba, palette]


def hf_pixels(images: list[Image.Image], processor: dict) -> np.ndarray:
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    cls = SiglipImageProcessorPil if processor["image_processor_type"].startswith("Siglip") else CLIPImageProcessorPil
    return cls(**processor)(images, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize(
    "processor",
    [
        CLIP_PROCESSOR,
        {**CLIP_PROCESSOR, "size": {"shortest_edge": 25}},  # under the crop: zero-padded, the odd row on top
        {**CLIP_PROCESSOR, "size": 31, "crop_size": 27, "resample": 2},  # old int spelling, odd sizes, bilinear
        SIGLIP_PROCESSOR,
    ],
    ids=["clip", "clip-pad", "clip-int-sizes", "siglip"],
)
def test_prepare_and_normalize_equal_transformers(processor):
    images = pictures()
    cfg = ImageProcessorConfig.from_dict(processor)
    crops = [prepare(image, cfg) for image in images]
    assert all(c.dtype == np.uint8 and c.shape == (*cfg.output_size, 3) for c in crops)
    ours = normalize(crops, cfg)
    assert ours.dtype == np.float32
    # bit for bit: the same float arithmetic in the same order (a float32 rescale would be off by ~1e-7)
    np.testing.assert_array_equal(ours, hf_pixels(images, processor))
    np.testing.assert_array_equal(normalize(np.stack(crops), cfg), ours)


def test_processor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CLIP_PROCESSOR))
    cfg = ImageProcessorConfig.from_dir(tmp_path)
    assert cfg == ImageProcessorConfig.from_dict(CLIP_PROCESSOR) and cfg.output_size == (28, 28)
    siglip = ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessorFast"})
    assert (siglip.do_center_crop, siglip.output_size, siglip.image_mean) == (False, (224, 224), [0.5] * 3)
    for kind in ("LlavaNextImageProcessor", "Qwen2VLImageProcessor"):
        with pytest.raises(ValueError, match=kind):
            ImageProcessorConfig.from_dict({"image_processor_type": kind})
    with pytest.raises(ValueError, match="longest_edge"):
        ImageProcessorConfig.from_dict({**CLIP_PROCESSOR, "size": {"shortest_edge": 30, "longest_edge": 60}})
    with pytest.raises(ValueError, match="many sizes"):
        ImageProcessorConfig.from_dict({**CLIP_PROCESSOR, "do_center_crop": False})
    with pytest.raises(FileNotFoundError):
        ImageProcessorConfig.from_dir(tmp_path / "nowhere")


def test_content_hash():
    cfg = ImageProcessorConfig.from_dict(CLIP_PROCESSOR)
    for picture in pictures()[:3]:
        png = io.BytesIO()
        picture.save(png, format="PNG")
        decoded = Image.open(io.BytesIO(png.getvalue()))
        crop = prepare(picture, cfg)
        assert content_hash(prepare(decoded, cfg)) == content_hash(crop)
        changed = crop.copy()
        changed[5, 7, 1] ^= 1
        assert content_hash(changed) != content_hash(crop)
        assert content_hash(crop.reshape(14, 56, 3)) != content_hash(crop)


def tiny_llava(out: Path, tower: str = "clip", hidden_act: str | None = None, **llava) -> Path:
    """A tiny LLaVA saved by transformers, seeded random weights (norms, biases and CLS too) so that a misplaced
    tensor shows."""
    import transformers as tf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14)
    if hidden_act:
        vision["hidden_act"] = hidden_act
    if tower == "clip":
        vision_config = tf.CLIPVisionConfig(image_size=28, **vision)
    else:
        vision_config = tf.SiglipVisionConfig(image_size=30, **vision)  # 30 = 2 patches and 2 pixels spare
    text = tf.LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    text.vocab_size = 128
    config = tf.LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=127, **llava)
    torch.manual_seed(7)
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


def hf_features(folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        # transformers 5: a BaseModelOutputWithPooling whose pooler_output is a list, one [tokens, hidden] per image
        return torch.stack(model.get_image_features(pixels).pooler_output)


def our_encoder(folder: Path, weights: dict | None = None) -> LlavaVisionEncoder:
    raw = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors") if weights is None else weights
    return LlavaVisionEncoder.build(raw, weights, torch.device("cpu"), torch.float32)


CASES = {  # name: (tower, llava config, layers built of 3)
    "clip-2-default": ("clip", dict(vision_feature_layer=-2), 2),
    "clip-1-full": ("clip", dict(vision_feature_layer=-1, vision_feature_select_strategy="full"), 3),
    "clip-list": ("clip", dict(vision_feature_layer=[0, -2]), 2),
    "clip-gelu-nobias": (
        "clip",
        dict(hidden_act="gelu", vision_feature_layer=[-1, 1], multimodal_projector_bias=False),
        3,
    ),
    "siglip-1-full": ("siglip", dict(vision_feature_layer=-1, vision_feature_select_strategy="full"), 3),
    "siglip-2-default": ("siglip", dict(vision_feature_layer=-2, projector_hidden_act="gelu_pytorch_tanh"), 2),
}


@pytest.mark.parametrize("case", CASES)
def test_encoder_equals_transformers(tmp_path, case):
    tower, llava, built = CASES[case]
    folder = tiny_llava(tmp_path, tower, **llava)
    encoder = our_encoder(folder)
    assert len(encoder.vision_tower.encoder.layers) == built  # only up to the deepest feature layer
    size = encoder.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours = encoder(pixels)
    theirs = hf_features(folder, pixels)
    assert ours.shape == theirs.shape == (3, encoder.tokens_per_image, 48)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def in_memory_name(saved: str) -> str:
    """transformers 5's in-memory name of a tensor saved as `name`."""
    if saved == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + saved.replace("language_model.model.", "language_model.")


def test_checkpoint_spellings_and_refusals(tmp_path):
    folder = tiny_llava(tmp_path)
    saved = load_file(folder / "model.safetensors")
    assert any(k.startswith("language_model.") for k in saved)  # skipped, not refused
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    expected = our_encoder(folder, saved)(pixels)
    hub = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in saved.items()}
    hub["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]  # old checkpoints' buffer
    in_memory = {in_memory_name(k): v for k, v in saved.items()}
    assert "lm_head.weight" in in_memory and "model.vision_tower.pre_layrnorm.bias" in in_memory
    for spelling in (hub, in_memory):
        torch.testing.assert_close(our_encoder(folder, spelling)(pixels), expected, atol=0, rtol=0)

    missing = dict(saved)
    del missing["vision_tower.encoder.layers.1.layer_norm2.bias"]
    with pytest.raises(KeyError, match=r"layers\.1\.layer_norm2\.bias"):
        our_encoder(folder, missing)
    with pytest.raises(KeyError, match="no place"):
        our_encoder(folder, {**saved, "multi_modal_projector.linear_3.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="28x28"):
        our_encoder(folder, saved)(torch.zeros(1, 3, 56, 56))


def test_tokens_per_image_and_config_refusals():
    base = {"text_config": {"hidden_size": 16}, "vision_config": {"image_size": 336, "patch_size": 14}}
    full = {**base, "vision_feature_select_strategy": "full"}
    siglip = {**full, "vision_config": {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14}}
    with torch.device("meta"):  # llava-1.5-sized towers: shapes only
        # llava-1.5: 24x24 patches, CLS dropped; kept; SigLIP has none
        for raw, tokens in ((base, 576), (full, 577), (siglip, 729)):
            assert LlavaVisionEncoder(raw).tokens_per_image == llava_image_tokens(raw) == tokens
        with pytest.raises(ValueError, match="out of range"):
            LlavaVisionEncoder({**base, "vision_feature_layer": -14})
        with pytest.raises(ValueError, match="not supported"):
            LlavaVisionEncoder({**base, "vision_config": {"model_type": "pixtral"}})

"""What a LLaVA's config.json says beyond its language model, torch-free (the gateway reads it too): the
vision tower's hyperparameters and how many placeholder tokens an image takes.

Hub files often spell only what differs from transformers' config classes' defaults (llava-1.5's text
config does); those defaults fill the rest, here, once.
"""

from dataclasses import dataclass

# transformers' LlamaConfig defaults, for LLaVA text configs that spell only what differs
LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
# a tower's model_type -> what its config may leave out (transformers' CLIPVisionConfig / SiglipVisionConfig)
TOWERS = {
    "clip_vision_model": dict(patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
TOWER_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
)


@dataclass
class VisionConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, raw: dict) -> "VisionConfig":
        kind = raw.get("model_type", "clip_vision_model")
        if kind not in TOWERS:
            raise ValueError(f"vision tower {kind!r} is not supported (supported: {', '.join(TOWERS)})")
        fields = {**TOWER_DEFAULTS, **TOWERS[kind], "model_type": kind}
        fields.update({k: raw[k] for k in fields if raw.get(k) is not None and k != "model_type"})
        if not isinstance(fields["image_size"], int) or not isinstance(fields["patch_size"], int):
            raise ValueError("only square images and patches are supported (image_size and patch_size ints)")
        return cls(**fields)

    @property
    def class_token(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def llava_text_config(raw: dict) -> dict:
    """The language model's config of a LLaVA config.json, with transformers' Llama defaults filled in."""
    text = dict(raw.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if text["model_type"] == "llama":
        for key, value in LLAMA_DEFAULTS.items():
            text.setdefault(key, value)
    return text


def llava_image_tokens(raw: dict) -> int:
    """How many placeholder tokens one image takes, as transformers' LlavaProcessor counts them: a token per
    patch, plus CLIP's class token, less one when the "default" feature strategy drops the first token."""
    vision = VisionConfig.from_dict(raw.get("vision_config") or {})
    strategy = raw.get("vision_feature_select_strategy", "default")
    return vision.num_patches + vision.class_token - (strategy == "default")

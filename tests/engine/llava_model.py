"""A tiny random LLaVA checkpoint folder, built offline with transformers, for the multimodal tests.

CLIP vision tower (56x56 images, 14x14 patches: 16 image tokens, features from the second-to-last layer, CLS
dropped), a GELU projector, and a Llama language model of the engine tests' tiny size, with SmolLM2's
tokenizer plus an `<image>` token (id 49152). Its chat template takes content as a list of parts and writes
`<image>` where an image part is, as llava-hf's do. Weights are seeded random, norms and biases too.
"""

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from shared.tokenizer import Tokenizer

IMAGE_SIZE = 56
IMAGE_TOKEN = "<image>"
LLAVA_CHAT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def build_tiny_llava(
    out: Path,
    text_tokenizer: Tokenizer,
    vision: dict = TINY_VISION,
    text: dict = TINY_TEXT,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """The folder; `vision` / `text` are CLIPVisionConfig / LlamaConfig fields (a benchmark sizes them up)."""
    import transformers as tf

    tok = HFTokenizer.from_str(text_tokenizer.tokenizer.to_str())
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    image_token_id = tok.token_to_id(IMAGE_TOKEN)
    vision = tf.CLIPVisionConfig(**vision, image_size=image_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    text = tf.LlamaConfig(**text, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
    torch.manual_seed(11)
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith((".bias", "class_embedding")):
                p.normal_(0, 0.2)
            elif "vision_tower" in name or "projector" in name:
                p.normal_(0, 0.2)  # large enough that images change the logits visibly
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": LLAVA_CHAT,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    (out / "preprocessor_config.json").write_text(json.dumps({**PROCESSOR, **sizes}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def random_image(seed: int, size: tuple[int, int] = (80, 64)):
    """A PIL RGB image of random pixels, smooth enough to survive resizing as a picture would."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


@torch.no_grad()
def hf_greedy_with_images(model, ids: list[int], pictures: list, n: int) -> list[int]:
    """transformers' greedy tokens for a prompt whose image tokens are expanded already, its pixels made by
    transformers' own CLIP image processor from the pictures."""
    from transformers import CLIPImageProcessorPil

    images = {}  # none at all for a text-only prompt: transformers would run the vision tower on None
    if pictures:
        images["pixel_values"] = CLIPImageProcessorPil(**PROCESSOR)(pictures, return_tensors="pt")["pixel_values"]
    out = model.generate(
        torch.tensor([ids]), **images, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def data_url(picture, fmt: str = "PNG", **save_options) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save_options)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"

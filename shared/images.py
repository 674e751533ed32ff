"""Image preprocessing for CLIP- and SigLIP-style vision towers (LLaVA-1.5 and kin), without torch.

Two halves, so that what travels between services is small: `prepare` (RGB, resize, center crop) gives uint8
pixels [H, W, 3], bounded by the model's input size; `normalize` (rescale, mean/std) turns a batch of those into
the float32 [N, 3, H, W] the vision tower takes. Together they equal transformers' PIL image processors
(CLIPImageProcessorPil, SiglipImageProcessorPil, the "slow" ones) bit for bit: the same resized size, resampling,
crop offsets and float arithmetic.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# image_processor_type (less a "Fast" or "Pil" suffix) -> its class defaults, for what a config leaves out
PROCESSORS = {
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ),
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ),
}
FEATURE_EXTRACTORS = {"CLIPFeatureExtractor": "CLIPImageProcessor"}  # older configs' spelling


@dataclass
class ImageProcessorConfig:
    image_processor_type: str = "CLIPImageProcessor"
    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    do_convert_rgb: bool = True

    @classmethod
    def from_dir(cls, path: str | Path) -> "ImageProcessorConfig":
        """From a Hugging Face model folder's preprocessor_config.json."""
        file = Path(path) / "preprocessor_config.json"
        if not file.exists():
            raise FileNotFoundError(f"{path} has no preprocessor_config.json (needed for a vision model's images)")
        return cls.from_dict(json.loads(file.read_text()))

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """From preprocessor_config.json's fields; what it leaves out takes the processor class's defaults. Raises
        ValueError for a processor or a size that is not a plain resize-and-crop to one fixed size."""
        kind = d.get("image_processor_type") or FEATURE_EXTRACTORS.get(d.get("feature_extractor_type"))
        kind = (kind or "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
        if kind not in PROCESSORS:
            raise ValueError(f"image_processor_type {kind!r} is not supported (supported: {', '.join(PROCESSORS)})")
        values = {**PROCESSORS[kind], **{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None}}
        values["image_processor_type"] = kind
        # transformers' spelling of old configs: an int size is the shortest edge, an int crop a square
        if isinstance(values["size"], int):
            values["size"] = {"shortest_edge": values["size"]}
        if isinstance(values.get("crop_size"), int):
            values["crop_size"] = {"height": values["crop_size"], "width": values["crop_size"]}
        return cls(**values)

    def __post_init__(self):
        # refuse what prepare could not do now, not per image
        if self.do_resize and set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"size {self.size} is not supported: {{'shortest_edge': n}} or {{'height', 'width'}}")
        self.output_size  # noqa: B018 -- raises for a config without one fixed output size

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every prepared image."""
        if self.do_center_crop:
            return _height_width(self.crop_size, "crop_size")
        if self.do_resize and set(self.size) == {"height", "width"}:
            return self.size["height"], self.size["width"]
        raise ValueError(f"images of many sizes (size {self.size}, no center crop): a vision tower takes one size")


def prepare(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """A decoded image -> uint8 [H, W, 3]: RGB (transparency composited onto white), resized, center-cropped.
    Always RGB, even with do_convert_rgb false: the towers take three channels."""
    image = _to_rgb(image)
    if cfg.do_resize:
        height, width = _resized_size(image.height, image.width, cfg.size)
        image = image.resize((width, height), resample=cfg.resample)
    pixels = np.asarray(image)
    if cfg.do_center_crop:
        pixels = _center_crop(pixels, *_height_width(cfg.crop_size, "crop_size"))
    return np.ascontiguousarray(pixels)


def normalize(crops: np.ndarray | list[np.ndarray], cfg: ImageProcessorConfig) -> np.ndarray:
    """Prepared images, uint8 [N, H, W, 3] (or a list of [H, W, 3]) -> float32 [N, 3, H, W], rescaled and
    normalized in transformers' order: uint8 -> float64 * factor -> float32, then (x - mean) / std in float32."""
    pixels = np.stack(crops) if isinstance(crops, list) else np.asarray(crops)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected prepared images [N, H, W, 3], got shape {pixels.shape}")
    if cfg.do_rescale:
        pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if cfg.do_normalize:
        mean, std = np.array(cfg.image_mean, np.float32), np.array(cfg.image_std, np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def content_hash(crop: np.ndarray) -> str:
    """Hex sha256 of a prepared image's shape and pixels: the image's identity for caches, the same for every
    encoding of the same picture once prepared."""
    digest = hashlib.sha256(f"{crop.dtype.str}{crop.shape}".encode())
    digest.update(np.ascontiguousarray(crop).data)
    return digest.hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def _resized_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    # transformers' rounding: the long side is truncated after a float division
    short, long = sorted((height, width))
    new_long = int(size["shortest_edge"] * long / short)
    return (new_long, size["shortest_edge"]) if width <= height else (size["shortest_edge"], new_long)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centered height x width window (the odd pixel off the bottom/right), as transformers crops. A side
    shorter than the crop is first zero-padded, centered (its odd row/column at the top/left)."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top < 0 or left < 0:
        pad_top, pad_left = math.ceil(max(height - h, 0) / 2), math.ceil(max(width - w, 0) / 2)
        canvas = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        canvas[pad_top : pad_top + h, pad_left : pad_left + w] = pixels
        pixels, top, left = canvas, top + pad_top, left + pad_left
    return pixels[top : top + height, left : left + width]


def _height_width(size: dict[str, int], name: str) -> tuple[int, int]:
    if set(size) != {"height", "width"}:
        raise ValueError(f"{name} {size} is not supported: expected {{'height': h, 'width': w}}")
    return size["height"], size["width"]

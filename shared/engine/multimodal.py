"""Images in the engine: a request's images by their placeholder spans, and the encoder that turns them into
the embeddings that replace those placeholders' token embeddings.

An image is encoded when a step's prompt chunk first reaches its span (not at all when the prefix cache
already holds that span), once for all its chunks, and kept by content hash for a while, so a repeated
image is not encoded again. Its pixels stay with the sequence: a preempted sequence recomputes its prompt.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from shared.engine.errors import InvalidRequestError
from shared.engine.loader import Checkpoint
from shared.engine.vision import LlavaVisionEncoder
from shared.images import ImageProcessorConfig, content_hash, normalize


@dataclass(eq=False)
class ImageInput:
    offset: int  # the first placeholder's position in the prompt
    length: int  # placeholders: the encoder's tokens per image
    hash: str  # content hash of the prepared pixels (shared.images.content_hash)
    pixels: np.ndarray  # uint8 [height, width, 3], resized and cropped (shared.images.prepare)
    embeds: torch.Tensor | None = None  # [length, hidden] while the prompt still needs them

    @property
    def span(self) -> tuple[int, int, str]:
        return self.offset, self.length, self.hash

    @classmethod
    def from_wire(cls, part: dict) -> "ImageInput":
        """From an ImageRef dict (shared/messages.py)."""
        try:
            pixels = np.frombuffer(part["pixels"], dtype=np.uint8).reshape(part["shape"])
            return cls(int(part["offset"]), int(part["length"]), str(part["hash"]), pixels)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"malformed image in the request: {e}", "images") from None


class ImageEncoder:
    """The vision tower and projector of a LLaVA, with an LRU of recent embeddings by content hash."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        processor: ImageProcessorConfig,
        image_token_id: int,
        cache_bytes: int = 256 << 20,
    ):
        self.encoder = encoder
        self.processor = processor
        self.image_token_id = image_token_id
        self.cache_bytes = cache_bytes
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cached_bytes = 0
        self.images_encoded = 0
        self.cache_hits = 0
        self.encode_seconds = 0.0

    @property
    def tokens_per_image(self) -> int:
        return self.encoder.tokens_per_image

    def check(self, prompt_token_ids: list[int], images: list[ImageInput]) -> None:
        """Each image spans exactly its placeholders, in order, and every placeholder belongs to an image."""
        shape = self.pixel_shape
        covered = 0
        for i, image in enumerate(sorted(images, key=lambda im: im.offset)):
            where = f"images[{i}]"
            if image.length != self.tokens_per_image:
                raise InvalidRequestError(
                    f"{where} spans {image.length} tokens; an image takes {self.tokens_per_image}", "images"
                )
            if image.offset < covered or image.offset + image.length > len(prompt_token_ids):
                raise InvalidRequestError(f"{where} overlaps another image or runs past the prompt", "images")
            span = prompt_token_ids[image.offset : image.offset + image.length]
            if any(t != self.image_token_id for t in span):
                raise InvalidRequestError(f"{where} is not over image placeholder tokens", "images")
            if image.pixels.shape != shape:
                raise InvalidRequestError(f"{where} is {image.pixels.shape}; this model takes {shape}", "images")
            if content_hash(image.pixels) != image.hash:  # the caches trust it: a wrong one would poison them
                raise InvalidRequestError(f"{where}'s content hash does not match its pixels", "images")
            covered = image.offset + image.length
        if prompt_token_ids.count(self.image_token_id) != len(images) * self.tokens_per_image:
            raise InvalidRequestError("the prompt's image placeholder tokens do not match its images", "images")

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        height, width = self.processor.output_size
        return height, width, 3

    def needs_encoding(self, image: ImageInput) -> bool:
        """Whether reaching the image would cost an encoding (its embeddings neither with it nor cached)."""
        return image.embeds is None and image.hash not in self.cache

    def encode(self, images: list[ImageInput]) -> None:
        """Give each image its embeddings: from the cache, else encoded here, all in one batch."""
        todo: dict[str, list[ImageInput]] = {}
        for image in images:
            if image.embeds is not None:
                continue
            if (hit := self.cache.get(image.hash)) is not None:
                self.cache.move_to_end(image.hash)
                self.cache_hits += 1
                image.embeds = hit
            else:
                todo.setdefault(image.hash, []).append(image)
        if not todo:
            return
        embeds = self.run([group[0].pixels for group in todo.values()])
        for (image_hash, group), rows in zip(todo.items(), embeds):
            rows = rows.clone()  # its own memory: a view would keep the whole batch's alive in the cache
            for image in group:
                image.embeds = rows
            self._remember(image_hash, rows)

    def run(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Prepared crops -> their embeddings, [n, tokens_per_image, hidden]."""
        started = time.perf_counter()
        param = next(self.encoder.parameters())
        pixels = torch.from_numpy(normalize(np.stack(crops), self.processor)).to(param.device, param.dtype)
        with torch.inference_mode():
            embeds = self.encoder(pixels)
        self.images_encoded += len(crops)
        self.encode_seconds += time.perf_counter() - started
        return embeds

    def _remember(self, image_hash: str, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if size > self.cache_bytes:
            return
        self.cache[image_hash] = rows
        self.cached_bytes += size
        while self.cached_bytes > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= old.numel() * old.element_size()

    def stats(self) -> dict:
        return {
            "images_encoded": self.images_encoded,
            "image_cache_hits": self.cache_hits,
            "image_encode_seconds": self.encode_seconds,
        }


def image_rows(
    encoder: ImageEncoder, chunks: list[tuple[object, int, int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a step's prompt chunks (sequence, start, end, first row in the step), the rows whose token
    embeddings an image's replace, and those embeddings. An image fully passed lets go of its embeddings."""
    reached = [
        (seq, start, end, base, image)
        for seq, start, end, base in chunks
        for image in seq.images
        if image.offset < end and image.offset + image.length > start
    ]
    if not reached:
        return None
    encoder.encode([image for *_, image in reached])
    rows, embeds = [], []
    for _, start, end, base, image in reached:
        lo, hi = max(start, image.offset), min(end, image.offset + image.length)
        rows.append(torch.arange(base + lo - start, base + hi - start))
        embeds.append(image.embeds[lo - image.offset : hi - image.offset].to(device))  # an encoder's are on the CPU
        if hi == image.offset + image.length:
            image.embeds = None
    return torch.cat(rows).to(device), torch.cat(embeds)


def build_image_encoder(
    config: dict, weights: dict[str, torch.Tensor], path: str, device: torch.device, dtype: torch.dtype
) -> ImageEncoder:
    """A LLaVA's vision tower and projector (its config.json and their tensors), with its folder's image
    preprocessing."""
    encoder = LlavaVisionEncoder.build(config, weights, device, dtype)
    return ImageEncoder(encoder, ImageProcessorConfig.from_dir(path), encoder.image_token_id)


def image_encoder_of(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> ImageEncoder | None:
    """A checkpoint's image encoder; None for a text-only model."""
    if checkpoint.vision_config is None:
        return None
    return build_image_encoder(checkpoint.vision_config, checkpoint.vision_weights, checkpoint.path, device, dtype)

"""Images in chat requests, on the gateway's side: found in the messages, fetched or decoded
(services/gateway/images.py), prepared to the model's input size, and placed in the prompt as the model's
image placeholder tokens.

Each image travels to the workers prepared (resized and cropped, uint8) with its content hash: bounded in
size whatever was uploaded, and the same picture keys the prefix cache the same however it was encoded.
"""

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import numpy as np

from services.gateway.images import ImageLimits, load_image
from shared.errors import invalid
from shared.images import ImageProcessorConfig, content_hash, prepare
from shared.messages import ImageRef


@dataclass
class VisionInfo:
    """How the served model takes images (ModelInfo.vision; None: it does not)."""

    image_token_id: int
    image_tokens: int  # placeholders per image
    processor: ImageProcessorConfig


@dataclass
class PreparedImage:
    crop: np.ndarray  # uint8 [height, width, 3]
    hash: str


def image_urls(body: dict) -> list[tuple[str, Any]]:
    """(param path, url) of each image part of a chat body's messages, in order. Anything malformed around
    them is left to the chat parser, which names it."""
    found = []
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                where = f"messages[{i}].content[{j}].image_url"
                value = part.get("image_url")
                found.append((where, value.get("url") if isinstance(value, dict) else value))
    return found


async def load_images(
    body: dict, model_name: str, vision: VisionInfo | None, limits: ImageLimits, session: aiohttp.ClientSession | None
) -> list[PreparedImage]:
    """Every image of a chat body, fetched or decoded, then prepared; a 400 naming the part otherwise."""
    urls = image_urls(body)
    if not urls:
        return []
    if vision is None:
        raise invalid(f"model {model_name!r} does not take images; send text content only", urls[0][0])
    if len(urls) > limits.max_images:
        raise invalid(f"{len(urls)} images in one request; the limit is {limits.max_images}", urls[-1][0])
    images = await asyncio.gather(*(load_image(url, where, limits, session) for where, url in urls))
    return await asyncio.to_thread(_prepare_all, images, vision.processor)


def _prepare_all(images: list, processor: ImageProcessorConfig) -> list[PreparedImage]:
    crops = [prepare(image, processor) for image in images]
    return [PreparedImage(crop, content_hash(crop)) for crop in crops]


def place_images(
    ids: list[int], images: list[PreparedImage], vision: VisionInfo | None
) -> tuple[list[int], list[dict[str, Any]]]:
    """The chat template wrote one image token per image: each becomes the model's placeholders for it.
    Returns the prompt and its ImageRefs (as dicts)."""
    if vision is None:
        return ids, []
    marks = [i for i, t in enumerate(ids) if t == vision.image_token_id]
    if len(marks) != len(images):
        raise invalid(
            f"the prompt holds {len(marks)} image tokens for {len(images)} images (is the image token written "
            "in the text, or does the chat template drop images?)",
            "messages",
        )
    out: list[int] = []
    refs = []
    start = 0
    for mark, image in zip(marks, images):
        out += ids[start:mark]
        refs.append(ImageRef(len(out), vision.image_tokens, image.hash, image.crop.tobytes(), list(image.crop.shape)))
        out += [vision.image_token_id] * vision.image_tokens
        start = mark + 1
    out += ids[start:]
    return out, [asdict(ref) for ref in refs]

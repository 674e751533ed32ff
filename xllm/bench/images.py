"""Images for the multimodal workload: `data:` URLs of random pictures, some from a small pool that repeats
(what an embedding cache and prefix caching with images are for), the rest fresh on every run (their
pixels come from the salt source, so no server has seen them)."""

import base64
import io
import random

import numpy as np
from PIL import Image

POOL = 8  # distinct pictures the repeated ones are drawn from


def picture_url(rng: np.random.Generator, size: int) -> str:
    """A PNG data URL of a smooth random picture (blocks of colour, resized: it compresses like a photo)."""
    small = rng.integers(0, 256, (max(1, size // 16), max(1, size // 16), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_images(
    n: int, per_request: int, repeat: float, size: int, rng: np.random.Generator, salt_rng: random.Random
) -> list[list[str]]:
    """`per_request` image URLs for each of `n` requests; each one from the repeated pool with probability
    `repeat`."""
    pool = [picture_url(rng, size) for _ in range(POOL)]
    fresh = np.random.default_rng(salt_rng.getrandbits(64))
    return [
        [
            pool[int(rng.integers(POOL))] if rng.random() < repeat else picture_url(fresh, size)
            for _ in range(per_request)
        ]
        for _ in range(n)
    ]

"""Chained hashes of full KV blocks: one definition for the engine's prefix cache and the kvcache index.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal prefixes. An
image's placeholder tokens are keyed by the image's content hash instead (`cache_keys`), so the same image
after the same text hits the cache, and another image at the same place does not.
"""

import hashlib
from collections.abc import Sequence

import numpy as np


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    if parent is not None:
        h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of `token_ids`, chained from the first."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def image_key(content_hash: str) -> int:
    """What an image's placeholder positions are keyed by: negative, so never a token id."""
    return -1 - int(content_hash[:15], 16)


def cache_keys(token_ids: Sequence[int], images: Sequence[tuple[int, int, str]]) -> list[int]:
    """Token ids as the prefix cache keys them; `images` are (offset, length, content hash) spans."""
    keys = list(token_ids)
    for offset, length, content_hash in images:
        keys[offset : offset + length] = [image_key(content_hash)] * length
    return keys

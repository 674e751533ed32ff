"""Chained hashes of full KV blocks: one definition for the engine's prefix cache and the kvcache index.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal prefixes.
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

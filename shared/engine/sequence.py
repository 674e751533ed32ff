"""A sequence's state: its tokens, its block table, how far its KV has been computed, its outputs; and
a request, its n sequences."""

from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count

import torch

from shared.block_hash import cache_keys
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        priority: int = 0,
        arrival: float = 0.0,
        images: list[ImageInput] | None = None,
    ):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n sequences
        self.params = params
        self.priority = priority  # 0 = online; larger runs later
        self.arrival = arrival
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of the prompt, served from the prefix cache at admission
        self.prefix_counted = False  # its prompt's lookup is in the prefix cache's hit rate
        self.num_hashed_blocks = 0  # leading full blocks already registered in the prefix cache
        self.last_block_hash: int | None = None  # the hash of the last of those
        self.num_forks = params.n - 1 if index == 0 else 0  # siblings still to be forked off
        self.spec_token_ids: list[int] = []  # draft tokens this step scores after the last token
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None  # set by the engine for seeded requests
        self.stop_checker = None  # set by the engine: detokenizes and checks stop strings
        self.images = sorted(images or [], key=lambda image: image.offset)  # the prompt's, by placeholder span
        # the prompt as the prefix cache keys it (None: as it is, no images)
        self.prompt_keys = cache_keys(prompt_token_ids, [i.span for i in self.images]) if self.images else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def key_tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) as the prefix cache keys them: an image's placeholders by its content hash."""
        if self.prompt_keys is None or start >= self.num_prompt_tokens:
            return self.token_ids[start:end]
        return self.prompt_keys[start:end] + self.token_ids[max(start, self.num_prompt_tokens) : end]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: online before offline, then first come first served."""
        return (self.priority, self.arrival, self.seq_id)


@dataclass
class Request:
    """A request's sequences (the first one's siblings are forked off as its prompt ends)."""

    request_id: str
    seqs: list[Sequence]
    n: int
    finished: set[int] = field(default_factory=set)  # indices of the finished sequences

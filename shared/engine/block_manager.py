"""KV blocks: a free list, ref counts, and a prefix cache on chained block hashes with LRU eviction.

A block whose ref count drops to zero keeps its hash and contents: it stays findable by later
requests with the same prefix until a new allocation needs it (least recently freed first).
Stored/removed blocks are reported through `on_event` so a global index can follow them.

With a second tier (`tier`, shared/engine/kv_tier.py), an evicted block goes down to it when that is cheaper
than recomputing it, and a prompt's prefix continues there where the pool's cached blocks end.
"""

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shared.block_hash import hash_block
from shared.engine.kv_tier import HostKvTier
from shared.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: list[int] = field(default_factory=list)  # kept to check hash collisions
    start: int = 0  # position of its first token in the sequence (what recomputing it would cost)


KvEventHook = Callable[[str, list[int], int | None, str], None]  # (event, block hashes, parent hash, tier)


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, on_event: KvEventHook | None = None
    ):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # never hashed, or evicted
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached, LRU first
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.on_event = on_event
        self.prefix_queries = 0  # full prompt blocks looked up (once a sequence)
        self.prefix_hits = 0  # of those, found in the cache (or the tier)
        self.tier: HostKvTier | None = None  # the second tier, when there is one

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate_prefix(self, seq: Sequence) -> None:
        """On admission: take the longest cached prefix of the prompt (never its last token,
        which must be computed to get logits)."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        chain = self._chain(seq, (seq.num_tokens - 1) // self.block_size)
        if self.tier is not None:  # what goes down while its blocks come up must not push them out
            chain = list(chain)
            self.tier.claim([h for h, _, _ in chain])
        for i, (h, tokens, parent) in enumerate(chain):
            block_id = self._cached(h, tokens, parent, i * self.block_size)
            if block_id is None:
                break
            seq.block_table.append(block_id)
        if self.tier is not None:
            self.tier.release()
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.num_output_tokens == 0:  # a recompute after preemption is not a cache hit to report
            seq.num_cached_tokens = seq.num_computed_tokens

    def count_lookup(self, seq: Sequence) -> None:
        """Add an admitted sequence's prompt lookup to the hit rate, once: every full block its prompt could take
        from the cache and those it did (an admission retried while it waits for room counts when it gets in; a
        preempted sequence coming back does not count again)."""
        if seq.prefix_counted or not self.enable_prefix_caching:
            return
        seq.prefix_counted = True
        self.prefix_queries += (seq.num_prompt_tokens - 1) // self.block_size
        self.prefix_hits += seq.num_cached_tokens // self.block_size

    def _chain(self, seq: Sequence, num_blocks: int) -> Iterator[tuple[int, list[int], int | None]]:
        """(hash, tokens, parent hash) of the sequence's first full blocks."""
        parent = None
        for i in range(num_blocks):
            tokens = seq.key_tokens(i * self.block_size, (i + 1) * self.block_size)
            h = hash_block(parent, tokens)
            yield h, tokens, parent
            parent = h

    def _cached(self, block_hash: int, tokens: list[int], parent: int | None, start: int) -> int | None:
        """The pool's block of this hash and these tokens, referenced; else the tier's, brought up into a free block."""
        block_id = self.hash_to_block.get(block_hash)
        if block_id is not None:
            if self.blocks[block_id].token_ids != tokens:
                return None
            self._ref(block_id)
            return block_id
        if self.tier is None or not self.tier.holds(block_hash) or not self.num_free_blocks:
            return None
        block_id = self._take_free()  # may send another block down first: the tier is asked after
        if not self.tier.load(block_hash, tokens, block_id):
            self.blocks[block_id].ref_count = 0
            self.free_ids.appendleft(block_id)
            return None
        self._register(self.blocks[block_id], block_hash, tokens, start)
        if self.on_event:
            self.on_event("stored", [block_hash], parent, "device")
        return block_id

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the block table cover `num_tokens` tokens; False (nothing taken) if blocks run out."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly completed blocks in the prefix cache (each block is looked at
        once: `seq.num_hashed_blocks` and `seq.last_block_hash` say how far it got)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        parent = seq.last_block_hash
        stored: list[int] = []
        first_parent = None
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:  # a prefix-cache hit, or shared with the sequence it forked from
                parent = block.hash
                continue
            tokens = seq.key_tokens(i * bs, (i + 1) * bs)
            h = hash_block(parent, tokens)
            if h not in self.hash_to_block:  # else computed twice (two equal prompts in one step): keep first
                if not stored:
                    first_parent = parent
                self._register(block, h, tokens, i * bs)
                stored.append(h)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)
        seq.last_block_hash = parent
        if stored and self.on_event:
            self.on_event("stored", stored, first_parent, "device")

    def fork(self, parent: Sequence, child: Sequence) -> int | None:
        """Share the parent's full blocks with a child; returns a fresh block for the partial last
        one, whose contents the caller copies (None if the prompt ends on a block boundary)."""
        full = parent.num_computed_tokens // self.block_size
        for block_id in parent.block_table[:full]:
            self._ref(block_id)
        child.block_table = parent.block_table[:full]
        partial = None
        if len(parent.block_table) > full:
            partial = self._take_free()
            child.block_table.append(partial)
        child.num_computed_tokens = parent.num_computed_tokens
        return partial

    def free(self, seq: Sequence) -> None:
        # Reverse order: a prefix's tail blocks become the first candidates for eviction.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks, seq.last_block_hash = 0, None

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's tokens (those that held rejected draft tokens' KV)."""
        keep = -(-seq.num_tokens // self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            self.blocks[block_id].ref_count = 0  # only ever this sequence's: draft blocks are never shared
            self.free_ids.append(block_id)
        del seq.block_table[keep:]

    def _register(self, block: Block, block_hash: int, tokens: list[int], start: int) -> None:
        block.hash, block.token_ids, block.start = block_hash, tokens, start
        self.hash_to_block[block_hash] = block.block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.evictable.pop(block_id, None)
        block.ref_count += 1

    def _take_free(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            self._evict(block_id)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is None:
            return
        tier = self.tier
        if tier is not None and not tier.holds(block.hash) and tier.worth_keeping(block.start):
            dropped = tier.store(block_id, block.hash, block.token_ids)
            if dropped is not None and self.on_event:
                if dropped:
                    self.on_event("removed", dropped, None, "host")
                self.on_event("stored", [block.hash], None, "host")
        del self.hash_to_block[block.hash]
        if self.on_event:
            self.on_event("removed", [block.hash], None, "device")
        block.hash, block.token_ids = None, []

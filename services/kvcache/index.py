"""The global KV block index: block hash -> {instance: tiers}, fed by KvEvents, pure (no I/O).

Event contract (what workers publish, see shared.messages.KvEvent):
- `seq` counts one instance's events 1, 2, 3, ... An instance id names one worker process lifetime,
  so a restarted worker starts again at 1 (or opens with "cleared", which resets whatever we knew).
- "stored": `block_hashes` (a chain continuing `parent_hash`) are now held on `tier`.
- "removed": they are no longer held on `tier`. "cleared": the instance holds nothing.

Reachability: hashes are chained, so a block is only useful if every block before it is held too.
We store what we are told and let the query walk the chain from the first block, stopping at the
first block an instance lacks; an orphan (its parent evicted first) is thus never counted.

Gaps: an event whose seq is not last_seq + 1 means we missed events, and a missed "removed" would
make us claim blocks the instance no longer has. We drop everything we knew about that instance
and go on from the new seq. The index then under-reports that instance until it stores new blocks
(a cache miss costs one prefill, a false hit costs a wrong routing decision on every request), which
is what an operator wants from a routing hint. A "cleared" event needs no history, so it never
counts as a gap. Events older than last_seq (a duplicate publish) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.messages import KvEvent

# Fastest first: a match is reported under the fastest tier that holds the block.
TIER_ORDER = ("device", "host", "disk")


def _tier_rank(tier: str) -> int:
    return TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER)


@dataclass
class InstanceState:
    last_seq: int | None = None  # None: no event seen yet
    blocks: dict[int, set[str]] = field(default_factory=dict)  # block hash -> tiers holding it


@dataclass
class ApplyResult:
    applied: bool
    gap: bool = False
    expected_seq: int | None = None  # set when gap


class KvIndex:
    """Block hash -> {instance_id: tiers}, plus per-instance sequence tracking."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, set[str]]] = {}
        self.instances: dict[str, InstanceState] = {}
        self.events_applied = 0
        self.gaps_detected = 0

    # -- updates ------------------------------------------------------------------------------------

    def apply(self, ev: KvEvent) -> ApplyResult:
        """Apply one event in the instance's sequence; detects gaps (see the module docstring)."""
        if ev.event not in ("stored", "removed", "cleared"):
            raise ValueError(f"unknown KV event {ev.event!r}")
        if (
            not isinstance(ev.seq, int)
            or not isinstance(ev.block_hashes, list)
            or not all(isinstance(h, int) for h in ev.block_hashes)
        ):
            raise ValueError("malformed KV event: seq must be an int, block_hashes a list of ints")
        st = self.instances.setdefault(ev.instance_id, InstanceState())
        gap, expected = False, None
        if st.last_seq is None:
            # History starting after seq 1: the stream's limits cut its head (or we joined late).
            gap = ev.event != "cleared" and ev.seq > 1
            expected = 1
        elif ev.seq <= st.last_seq:
            return ApplyResult(applied=False)  # duplicate or replayed twice
        elif ev.seq != st.last_seq + 1 and ev.event != "cleared":
            gap, expected = True, st.last_seq + 1
        if gap:
            self.gaps_detected += 1
            self._clear(ev.instance_id, st)
        st.last_seq = ev.seq

        if ev.event == "stored":
            for h in ev.block_hashes:
                tiers = st.blocks.get(h)
                if tiers is None:  # one set object, shared by both maps
                    tiers = st.blocks[h] = set()
                    self.blocks.setdefault(h, {})[ev.instance_id] = tiers
                tiers.add(ev.tier)
        elif ev.event == "removed":
            for h in ev.block_hashes:
                self._remove_block(ev.instance_id, st, h, ev.tier)
        else:  # "cleared"
            self._clear(ev.instance_id, st)
        self.events_applied += 1
        return ApplyResult(applied=True, gap=gap, expected_seq=expected if gap else None)

    def drop_instance(self, instance_id: str) -> bool:
        """Forget an instance entirely (it left the registry). Returns whether it was known."""
        st = self.instances.pop(instance_id, None)
        if st is None:
            return False
        self._clear(instance_id, st)
        return True

    # -- queries ------------------------------------------------------------------------------------

    def longest_prefix(self, hashes: Iterable[int]) -> dict[str, list[str]]:
        """Per instance, the fastest tier of each leading block of `hashes` it holds (0 blocks: absent).

        Walks the chain once, keeping the instances that held every block so far.
        """
        result: dict[str, list[str]] = {}
        alive: dict[str, list[str]] | None = None
        for h in hashes:
            holders = self.blocks.get(h)
            if not holders:
                break
            if alive is None:
                alive = {iid: [] for iid in holders}
            else:
                for iid in [i for i in alive if i not in holders]:
                    result[iid] = alive.pop(iid)
                if not alive:
                    break
            for iid, tiers in alive.items():
                tiers.append(min(holders[iid], key=_tier_rank))
        result.update(alive or {})
        return result

    def matches(self, hashes: Iterable[int]) -> dict[str, int]:
        """Per instance, the number of leading blocks of `hashes` it holds."""
        return {iid: len(tiers) for iid, tiers in self.longest_prefix(hashes).items()}

    @property
    def size(self) -> int:
        """Distinct block hashes held anywhere."""
        return len(self.blocks)

    @property
    def entries(self) -> int:
        """(block, instance) pairs: the index's memory footprint."""
        return sum(len(st.blocks) for st in self.instances.values())

    # -- internals ----------------------------------------------------------------------------------

    def _remove_block(self, iid: str, st: InstanceState, h: int, tier: str) -> None:
        tiers = st.blocks.get(h)
        if tiers is None:
            return
        tiers.discard(tier)
        if tiers:
            return  # still held on another tier
        del st.blocks[h]
        holders = self.blocks[h]
        del holders[iid]
        if not holders:
            del self.blocks[h]

    def _clear(self, iid: str, st: InstanceState) -> None:
        for h in st.blocks:
            holders = self.blocks.get(h)
            if holders is not None:
                holders.pop(iid, None)
                if not holders:
                    del self.blocks[h]
        st.blocks.clear()

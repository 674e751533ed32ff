"""Which instances a request may go to, and in what order: the router's pluggable ranking.

    path = choose_path(config.mode, instances)          # "colocated" | "disaggregated" | None
    ranked = await policy.rank(candidates, request)      # best first (= order(.., cached_tokens(..)))

A policy only orders the candidates it is given; the service has already dropped instances that are
not "ready", of the wrong role, or over the waiting cap. Scores are "load units" (about one queued
request each): lower is better.

- `LeastLoadedPolicy`: the instance's last heartbeat (running, waiting, KV fullness) plus the
  requests this router sent it in the last `RecentForwards.window_s` seconds, which the heartbeat
  does not show yet; without them a burst would all land on one instance between two heartbeats.
- `PrefixAwarePolicy`: the same load, minus a bonus for the share of the prompt an instance already
  holds in its prefix cache (asked of the kvcache service; any failure falls back to load alone). A block
  held in an instance's second KV tier counts for what it saves: recomputing it less bringing it up.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from shared.block_hash import cache_keys
from shared.cost_model import CostModel
from shared.logging import get_logger
from shared.messages import GenerateRequest, InstanceInfo, KvQuery, KvQueryReply

log = get_logger("xllm.router")

READY = "ready"
COLOCATED = "colocated"
DISAGGREGATED = "disaggregated"
MODES = ("auto", COLOCATED, DISAGGREGATED)
# Roles a path needs, the entry role (the one the router sends the request to) first.
PATH_ROLES: dict[str, tuple[str, ...]] = {COLOCATED: ("colocated",), DISAGGREGATED: ("prefill", "decode")}


def choose_path(mode: str, instances: Iterable[InstanceInfo]) -> str | None:
    """The serving path for the next request, or None when the instances cannot serve `mode`.

    auto: prefill -> decode when both roles have a ready instance, else colocated. (Workload-adaptive
    PD / EPD splitting will replace this one decision.)
    """
    roles = {i.role for i in instances if i.state == READY}
    disaggregated = {"prefill", "decode"} <= roles
    if mode == DISAGGREGATED or (mode == "auto" and disaggregated):
        return DISAGGREGATED if disaggregated else None
    return COLOCATED if "colocated" in roles else None


class Policy(Protocol):
    async def cached_tokens(self, instances: list[InstanceInfo], request: GenerateRequest) -> dict[str, int]:
        """Per instance id, how many of the prompt's tokens it holds in its prefix cache (as far as known)."""
        ...

    def order(
        self, instances: list[InstanceInfo], request: GenerateRequest, cached: dict[str, int]
    ) -> list[InstanceInfo]:
        """All of `instances`, best first."""
        ...

    async def rank(self, instances: list[InstanceInfo], request: GenerateRequest) -> list[InstanceInfo]:
        """`order` with what `cached_tokens` finds."""
        ...


class RecentForwards:
    """Per instance, what this router sent it in the last `window_s` seconds: how many requests, and the
    prompt tokens and predicted prefill seconds they carry (work its heartbeat does not show yet)."""

    def __init__(self, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._sent: dict[str, deque[tuple[float, int, float]]] = {}  # (time, tokens, seconds)

    def record(self, instance_id: str, tokens: int = 0, seconds: float = 0.0) -> None:
        self._sent.setdefault(instance_id, deque()).append((self.clock(), tokens, seconds))

    def _window(self, instance_id: str) -> deque[tuple[float, int, float]]:
        sent = self._sent.get(instance_id, deque())
        horizon = self.clock() - self.window_s
        while sent and sent[0][0] < horizon:
            sent.popleft()
        return sent

    def count(self, instance_id: str) -> int:
        return len(self._window(instance_id))

    def work(self, instance_id: str) -> tuple[int, float]:
        """Prompt tokens and predicted prefill seconds sent to the instance within the window and not yet done, as
        a queue the instance drains in real time (a prompt sent half a second ago that takes a tenth is done)."""
        sent = self._window(instance_id)
        tokens, seconds = sum(t for _, t, _ in sent), sum(s for _, _, s in sent)
        if seconds <= 0:  # nothing priced (no cost model): all of it counts
            return tokens, 0.0
        backlog, last = 0.0, sent[0][0]
        for at, _, s in sent:
            backlog = max(0.0, backlog - (at - last)) + s
            last = at
        backlog = max(0.0, backlog - (self.clock() - last))
        return round(tokens * backlog / seconds), backlog

    def retain(self, instance_ids: Iterable[str]) -> None:
        """Forget instances that left the registry (keeps memory bounded)."""
        keep = set(instance_ids)
        for iid in [i for i in self._sent if i not in keep]:
            del self._sent[iid]


@dataclass
class LoadWeights:
    running: float = 1.0
    waiting: float = 2.0  # a queued request costs more than a running one: it has not had its TTFT yet
    recent: float = 1.0  # a request we just sent counts as queued-or-running, unseen by the heartbeat
    kv_full: float = 4.0  # a full KV cache (preemption ahead) weighs like this many running requests


def load_score(info: InstanceInfo, recent: int = 0, weights: LoadWeights | None = None) -> float:
    w = weights or LoadWeights()
    used = 1.0 - info.free_blocks / info.total_blocks if info.total_blocks > 0 else 0.0
    return w.running * info.running + w.waiting * info.waiting + w.recent * recent + w.kv_full * used


class LeastLoadedPolicy:
    """Lowest load score first; ties in random order (so several routers do not pile on one)."""

    def __init__(
        self, recent: RecentForwards | None = None, weights: LoadWeights | None = None, rng: random.Random | None = None
    ):
        self.recent = recent or RecentForwards()
        self.weights = weights or LoadWeights()
        self.rng = rng or random.Random()

    def score(self, info: InstanceInfo) -> float:
        return load_score(info, self.recent.count(info.instance_id), self.weights)

    async def cached_tokens(self, instances: list[InstanceInfo], request: GenerateRequest) -> dict[str, int]:
        return {}

    def order(
        self, instances: list[InstanceInfo], request: GenerateRequest, cached: dict[str, int]
    ) -> list[InstanceInfo]:
        return sorted(instances, key=lambda i: (self.score(i), self.rng.random()))

    async def rank(self, instances: list[InstanceInfo], request: GenerateRequest) -> list[InstanceInfo]:
        return self.order(instances, request, await self.cached_tokens(instances, request))


KvQueryFn = Callable[[KvQuery], Awaitable[KvQueryReply]]


class PrefixAwarePolicy(LeastLoadedPolicy):
    """Load score minus `prefix_weight` x (share of the prompt's full blocks cached on the instance).

    With the defaults a full prefix hit outweighs two queued requests. `query` asks the kvcache
    service (the service wraps a short NATS request); a failure or an error reply ranks by load alone.
    The query uses the first candidate's block size: instances with another size never match.
    """

    def __init__(
        self,
        query: KvQueryFn,
        recent: RecentForwards | None = None,
        weights: LoadWeights | None = None,
        prefix_weight: float = 4.0,
        rng: random.Random | None = None,
    ):
        super().__init__(recent, weights, rng)
        self.query = query
        self.prefix_weight = prefix_weight
        self.queries = 0
        self.fallbacks = 0  # queries that failed: ranked by load alone

    def order(
        self, instances: list[InstanceInfo], request: GenerateRequest, cached: dict[str, int]
    ) -> list[InstanceInfo]:
        block_size = instances[0].block_size if instances else 0
        full = len(request.prompt_token_ids) // block_size * block_size if block_size > 0 else 0  # cacheable
        bonus = {iid: self.prefix_weight * tokens / full for iid, tokens in cached.items() if full}
        return sorted(instances, key=lambda i: (self.score(i) - bonus.get(i.instance_id, 0.0), self.rng.random()))

    async def cached_tokens(self, instances: list[InstanceInfo], request: GenerateRequest) -> dict[str, int]:
        if not instances:
            return {}
        block_size = instances[0].block_size
        if block_size <= 0 or len(request.prompt_token_ids) < block_size:
            return {}  # not one full block: nothing can be cached
        self.queries += 1
        try:
            spans = [(image["offset"], image["length"], image["hash"]) for image in request.images]
            keys = cache_keys(request.prompt_token_ids, spans)  # an image's blocks keyed by its content
            reply = await self.query(KvQuery(request.request_id, keys, block_size))
            if reply.error:
                raise RuntimeError(reply.error)
        except Exception as e:
            self.fallbacks += 1
            log.warning("kv_query_failed", error=f"{type(e).__name__}: {e}", fallback="least-loaded")
            return {}
        by_id = {i.instance_id: i for i in instances}
        return {
            iid: round(held_blocks(by_id[iid], reply.tiers.get(iid, {"device": n})) * block_size)
            for iid, n in reply.matches.items()
            if iid in by_id
        }


def held_blocks(info: InstanceInfo, tiers: dict[str, int]) -> float:
    """The blocks of a prompt's prefix an instance holds, per tier (device first), counted as pool blocks: one in
    its second tier is worth 1 - (seconds to bring it up) / (seconds to recompute it), by what the instance
    measured (worth 1 until it has)."""
    device, host = tiers.get("device", 0), sum(n for tier, n in tiers.items() if tier != "device")
    model, fetch = CostModel.from_dict(info.cost), info.counters.get("kv_fetch_seconds_per_block")
    if not host or model is None or fetch is None:
        return device + host
    size = info.block_size
    recompute = sum(model.prefill_work(size, j * size) for j in range(device, device + host))
    return device + host * max(0.0, 1.0 - host * fetch / recompute) if recompute > 0 else device


def make_policy(name: str, query: KvQueryFn, recent: RecentForwards, prefix_weight: float) -> Policy:
    """The policy `--policy` names: "prefix-aware" (asking the kvcache service with `query`) or "least-loaded"."""
    if name == "prefix-aware":
        return PrefixAwarePolicy(query, recent, LoadWeights(), prefix_weight)
    return LeastLoadedPolicy(recent)

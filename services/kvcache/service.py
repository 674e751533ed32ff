"""kvcache service: follows every worker's KV events, answers "longest cached prefix per instance".

    workers --KvEvent--> JetStream XLLM_KV_EVENTS --ordered consumer--> KvIndex
    router  --KvQuery--> xllm.kvcache.query (queue "kvcache") --> KvQueryReply

Replay: the index lives in memory, so a (re)started service must read the stream from its first
message whatever it read before. An ordered consumer does exactly that: ephemeral (nothing to clean
up, no name to share between replicas), every replica sees every event in order, and nats-py
re-creates it from the last sequence it saw after a NATS restart or a missed heartbeat. A durable
consumer would remember a position we have no use for, since the index died with the process; it
would also have to be per replica to give each replica every event. Queries are only served once
the replay has caught up with the stream as it was at start, so a restart never answers from a
half-built index.

After a NATS reconnection the consumer is made again from the event after the last one applied (a
restarted server forgot it; waiting for the client to notice missed heartbeats would take ~10 s).

Departed instances: when the process's live registry view says an instance left (its entry removed,
or no heartbeat for the TTL), its entries are dropped from the index and its subject purged from the
stream so that replays stay short. An instance seen only in events, never in the registry, counts as
departed once a TTL passes without its heartbeat. If it was only stalled and comes back, its next event
shows a sequence gap and it is indexed afresh from there.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry

from services.kvcache.config import KvCacheConfig
from services.kvcache.index import KvIndex
from shared import bus, subjects
from shared.block_hash import block_hashes
from shared.instance_view import InstanceView
from shared.logging import bind_request, get_logger
from shared.messages import KvEvent, KvQuery, KvQueryReply, SchemaError
from shared.metrics import StatsCollector
from shared.retry import retry

log = get_logger("xllm.kvcache")


class KvCacheService:
    """One replica of the service. Counters below are read by the metrics exporter."""

    name = "kvcache"

    def __init__(self, config: KvCacheConfig, view: InstanceView | None = None):
        self.nc: Client | None = None
        self.config = config
        self.view = view
        self.index = KvIndex()
        self.ready = asyncio.Event()  # replay caught up; queries are served
        self.queries_served = 0
        self.bad_events = 0
        self.instances_dropped = 0
        self._replay_until = 0  # stream sequence of the last message present at start
        self._last_seq = 0  # stream sequence of the last event handled
        self._events_sub = None
        self._query_sub = None
        self._tasks: set[asyncio.Task] = set()
        self._own_view: InstanceView | None = None
        self.metrics = CollectorRegistry()
        self.metrics.register(StatsCollector("xllm_kvcache", self.stats))

    # -- metrics ------------------------------------------------------------------------------------

    @property
    def events_applied(self) -> int:
        return self.index.events_applied

    @property
    def gaps_detected(self) -> int:
        return self.index.gaps_detected

    @property
    def index_size(self) -> int:
        return self.index.size

    def stats(self) -> dict[str, int]:
        return {
            "events_applied": self.events_applied,
            "gaps_detected": self.gaps_detected,
            "queries_served": self.queries_served,
            "index_size": self.index_size,
            "index_entries": self.index.entries,
            "instances": len(self.index.instances),
            "bad_events": self.bad_events,
            "instances_dropped": self.instances_dropped,
        }

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, nc: Client) -> None:
        """Replay the event stream, then serve queries and follow new events."""
        self.nc = nc
        js = nc.jetstream()
        await bus.ensure_stream(js, bus.KV_EVENTS)
        if self.view is None:
            self.view = self._own_view = await InstanceView.open(self.nc)
        self.view.on_gone.append(self._instance_gone)
        state = (await js.stream_info(subjects.KV_EVENTS_STREAM)).state
        self._replay_until = state.last_seq if state.messages else 0
        if not self._replay_until:
            self.ready.set()
        await self._follow(DeliverPolicy.ALL)
        bus.on_connection(self.nc, restored=lambda: self._spawn(self._follow_again()))
        await self._wait_replayed(js)
        log.info(
            "kvcache_replayed",
            events=self.events_applied,
            gaps=self.gaps_detected,
            instances=len(self.index.instances),
            blocks=self.index_size,
        )
        self._query_sub = await self.nc.subscribe(
            subjects.KVCACHE_QUERY, queue=subjects.KVCACHE_QUEUE, cb=self._on_query
        )

    async def _follow(self, policy: DeliverPolicy, start_seq: int | None = None) -> None:
        config = ConsumerConfig(deliver_policy=policy, opt_start_seq=start_seq)
        self._events_sub = await self.nc.jetstream().subscribe(
            f"{subjects.KV_EVENTS_PREFIX}.>",
            stream=subjects.KV_EVENTS_STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            config=config,
            idle_heartbeat=5.0,
        )

    async def _follow_again(self) -> None:
        """Back on NATS: follow the stream from the event after the last one handled."""
        old, self._events_sub = self._events_sub, None
        with suppress(Exception):  # its consumer may have died with the server
            await old.unsubscribe()
        await retry(lambda: self._follow(DeliverPolicy.BY_START_SEQUENCE, self._last_seq + 1), "kv_events_follow")
        log.info("kv_events_followed_again", from_seq=self._last_seq + 1)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_replayed(self, js: JetStreamContext) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.replay_timeout_s
        while not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), 1.0)
            except TimeoutError:
                # The messages we wait for may have aged out of the stream meanwhile: nothing to wait for.
                state = (await js.stream_info(subjects.KV_EVENTS_STREAM)).state
                if not state.messages or state.first_seq > self._replay_until:
                    self.ready.set()
                elif asyncio.get_running_loop().time() > deadline:
                    log.warning("replay_slow", applied=self.events_applied, until_seq=self._replay_until)
                    self.ready.set()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.view is not None and self._instance_gone in self.view.on_gone:
            self.view.on_gone.remove(self._instance_gone)
        for sub in (self._query_sub, self._events_sub):
            if sub is not None and not self.nc.is_closed:
                await sub.unsubscribe()
        self._query_sub = self._events_sub = None
        if self._own_view is not None:
            await self._own_view.close()

    # -- handlers -----------------------------------------------------------------------------------

    async def _on_event(self, msg: Msg) -> None:
        try:
            ev = KvEvent.decode(msg.data)
            result = self.index.apply(ev)
        except Exception as e:  # SchemaError, ValueError: one bad publisher must not stop the feed
            self.bad_events += 1
            log.warning("bad_kv_event", subject=msg.subject, error=str(e))
        else:
            if result.gap:
                log.warning(
                    "kv_event_gap",
                    instance=ev.instance_id,
                    expected_seq=result.expected_seq,
                    got_seq=ev.seq,
                    action="dropped the instance's entries",
                )
            if ev.instance_id in self.index.instances:
                self.view.expect(ev.instance_id)  # gone unless it heartbeats
        meta = msg.metadata
        self._last_seq = meta.sequence.stream
        if not self.ready.is_set() and (meta.sequence.stream >= self._replay_until or meta.num_pending == 0):
            self.ready.set()

    async def _on_query(self, msg: Msg) -> None:
        try:
            q = KvQuery.decode(msg.data)
        except SchemaError as e:
            await bus.respond(msg, KvQueryReply(request_id="", error=str(e)))
            return
        with bind_request(q.request_id):
            reply = self.query(q)
            await bus.respond(msg, reply)
            log.debug("kv_query", blocks=reply.num_blocks, matches=reply.matches, error=reply.error)

    def query(self, q: KvQuery) -> KvQueryReply:
        """Longest cached prefix of `q.token_ids` per instance, in blocks of `q.block_size`."""
        self.queries_served += 1
        if not isinstance(q.block_size, int) or q.block_size <= 0:
            return KvQueryReply(request_id=q.request_id, error=f"block_size {q.block_size!r} must be > 0")
        if not isinstance(q.token_ids, list) or not all(isinstance(t, int) for t in q.token_ids):
            return KvQueryReply(request_id=q.request_id, error="token_ids must be a list of ints")
        hashes = block_hashes(q.token_ids, q.block_size)
        tiers = self.index.longest_prefix(hashes)
        by_tier: dict[str, dict[str, int]] = {}
        for iid, ts in tiers.items():
            counts = by_tier[iid] = {}
            for t in ts:
                counts[t] = counts.get(t, 0) + 1
        return KvQueryReply(
            request_id=q.request_id,
            matches={i: len(ts) for i, ts in tiers.items()},
            tiers=by_tier,
            num_blocks=len(hashes),
        )

    # -- departed instances -------------------------------------------------------------------------

    def _instance_gone(self, instance_id: str) -> None:
        if self.index.drop_instance(instance_id):
            self.instances_dropped += 1
            log.info("instance_dropped", instance=instance_id, reason="left the registry")
            self._spawn(self._purge(instance_id))

    async def _purge(self, instance_id: str) -> None:
        try:
            await self.nc.jetstream().purge_stream(subjects.KV_EVENTS_STREAM, subject=subjects.kv_events(instance_id))
        except Exception as e:  # NATS hiccup: the history stays, a replay drops the instance again
            log.warning("kv_events_purge_failed", instance=instance_id, error=f"{type(e).__name__}: {e}")

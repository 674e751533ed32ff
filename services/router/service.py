"""Router service: takes GenerateRequests from the gateway and hands each to a worker that accepts it.

    gateway --GenerateRequest--> xllm.router.generate (queue "router")
    router  --GenerateRequest--> xllm.worker.<id>.generate   --> Ack (ok, or refused with an error)
    router  --RouteReply-------> the gateway's reply inbox, when it sent a NATS request

Per request: choose the path (colocated, or prefill -> decode with `decode_instance` set), drop instances that
are not ready or over the waiting cap, rank the rest with the policy, plan (services/router/adaptive.py: split or
whole, or 429 by the TTFT target), then forward to the best one. No responder, no ack within `ack_timeout_s`,
or an overloaded refusal (429 / 503): try the next one, up to `max_attempts` (when every instance it knew
failed, it looks once more at the live registry view: a worker may have registered meanwhile). Any other
refusal (say a 400) is the request's fault and is passed on as it is. A request nobody takes gets a finished
StreamChunk with the error on its reply subject, so it never hangs. Mixed instances are switched between the
prefill and decode pools as the load asks (services/router/roles.py).

Priority (0 online, 1 offline) passes through unchanged: the engine orders by it. The router only
holds offline requests to a stricter waiting cap (`max_waiting_offline`), so an offline flood is
refused (429, the job runner retries) before it fills the queues online requests need.

After an ack timeout the router broadcasts an abort for the request before trying elsewhere: a worker that
took it late must not stream a second answer to the same reply subject. The instances come from the process's
live registry view (shared/instance_view.py): routing costs no registry round trip, and an instance that stops
heartbeating leaves it within the TTL (~5 s).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from services.router.adaptive import Slo, prefill_seconds, slo_refusal
from services.router.adaptive import plan as choose
from services.router.config import RouterConfig
from services.router.encoders import Encoders
from services.router.policy import (
    PATH_ROLES,
    READY,
    Policy,
    RecentForwards,
    choose_path,
    make_policy,
)
from services.router.roles import RoleSwitcher
from shared import bus, subjects
from shared.errors import ApiError, invalid, overloaded, unavailable
from shared.instance_view import InstanceView
from shared.logging import bind_request, get_logger
from shared.messages import (
    AbortRequest,
    Ack,
    GenerateRequest,
    InstanceInfo,
    KvQuery,
    KvQueryReply,
    RouteReply,
    SchemaError,
    StreamChunk,
)
from shared.metrics import StatsCollector

log = get_logger("xllm.router")


@dataclass
class Refusal:
    """Why one forward did not take: `retry` says whether another instance may."""

    reason: str  # "no_responders" | "timeout" | "overloaded" | "unavailable" | "bad_ack" | "rejected"
    retry: bool = True
    error: ApiError | None = None


class RouterService:
    """One router replica. Counters (`routed`, `retries`, `failures`, `attempt_errors`) are for metrics."""

    name = "router"

    def __init__(self, config: RouterConfig, *, view: InstanceView | None = None, policy: Policy | None = None):
        self.nc: Client | None = None
        self.config = config
        self.view = view
        self.recent = RecentForwards(config.recent_window_s)
        self.policy = policy or make_policy(config.policy, self._query_kv, self.recent, config.prefix_weight)
        self.routed = 0  # requests an instance took
        self.retries = 0  # forwards after the first one of a request
        self.failures: Counter[str] = Counter()  # requests that failed, by reason
        self.attempt_errors: Counter[str] = Counter()  # forwards that did not take, by reason
        self.paths: Counter[str] = Counter()  # requests by the path they took (or "refused" by the TTFT target)
        self.slo = Slo.from_ms(config.slo_ttft_ms, config.slo_tpot_ms, config.slo_reject_factor)
        self.switcher = RoleSwitcher(self.slo)  # mixed instances between the prefill and decode pools
        self._suspects: dict[str, float] = {}  # instance id -> monotonic time it stops being suspect
        self.encoders = Encoders(
            config.encode, config.encode_timeout_s, self._suspect, self._suspects_last, self.recent
        )
        self._tasks: set[asyncio.Task] = set()
        self._sub: Any = None
        self._own_view: InstanceView | None = None
        self.metrics = CollectorRegistry()
        self.metrics.register(StatsCollector("xllm_router", self.stats))

    async def _query_kv(self, q: KvQuery) -> KvQueryReply:
        timeout = self.config.kv_query_timeout_s
        return await bus.request(self.nc, subjects.KVCACHE_QUERY, q, KvQueryReply, timeout=timeout)

    @property
    def instances(self) -> list[InstanceInfo]:
        return self.view.instances() if self.view is not None else []

    def stats(self) -> dict[str, Any]:
        return {
            "routed": self.routed,
            "retries": self.retries,
            "failures": dict(self.failures),
            "attempt_errors": dict(self.attempt_errors),
            "encodes": dict(self.encoders.counts),
            "paths": dict(self.paths),
            "role_switches": dict(self.switcher.switches),
            "instances": len(self.instances),
            "inflight": len(self._tasks),
        }

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, nc: Client) -> None:
        self.nc = self.encoders.nc = nc
        if self.view is None:
            self.view = self._own_view = await InstanceView.open(self.nc)
        self.view.on_gone.append(self._forget)
        self._sub = await self.nc.subscribe(subjects.ROUTER_GENERATE, queue=subjects.ROUTER_QUEUE, cb=self._on_message)

    async def stop(self) -> None:
        """Stop taking requests, let those being routed finish (bounded)."""
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()
        self._sub = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.max_attempts * self.config.ack_timeout_s + 1)
            for task in self._tasks:
                task.cancel()
        if self.view is not None and self._forget in self.view.on_gone:
            self.view.on_gone.remove(self._forget)
        if self._own_view is not None:
            await self._own_view.close()

    def _forget(self, instance_id: str) -> None:
        """An instance left the registry: its bookkeeping goes too (memory stays bounded)."""
        self.recent.retain(i.instance_id for i in self.instances)
        self._suspects.pop(instance_id, None)
        self.encoders.forget(instance_id)
        self.switcher.forget(instance_id)

    # -- request handling ---------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time: route each request in its own task.
        # And if the pools call for it now, a mixed instance switched between them (services/router/roles.py).
        switch = self.switcher.look(self.instances) if self.switcher.due() else None
        handle = self._handle(msg, overflow=len(self._tasks) >= self.config.max_inflight)
        for work in (handle, self.switcher.apply(self.nc, switch)) if switch else (handle,):
            task = asyncio.create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg, overflow: bool = False) -> None:
        try:
            req = GenerateRequest.decode(msg.data)
        except SchemaError as e:
            self.failures["bad_message"] += 1
            log.warning("bad_request_message", error=str(e))
            await bus.respond(msg, RouteReply("", error=invalid(f"bad GenerateRequest: {e}").to_wire()))
            return
        with bind_request(req.request_id):
            if not req.reply_subject:
                reply = self._fail(req, "bad_message", invalid("reply_subject is empty", "reply_subject"))
            elif overflow:
                reply = self._fail(
                    req, "overloaded", overloaded(f"the router is routing {self.config.max_inflight} requests already")
                )
            else:
                try:
                    reply = await self.route(req)
                except Exception as e:  # a bug or a bus failure: the request still gets an answer
                    log.exception("route_crashed")
                    reply = self._fail(req, "error", unavailable(f"router error: {type(e).__name__}: {e}"))
            if reply.error and req.reply_subject:
                chunk = StreamChunk(req.request_id, finished=True, error=reply.error)
                await self.nc.publish(req.reply_subject, chunk.encode())
            await bus.respond(msg, reply)

    async def route(self, req: GenerateRequest) -> RouteReply:
        """Forward `req` to an instance (or prefill + decode pair) that takes it; RouteReply says which."""
        path = choose_path(self.config.mode, self.instances)
        if path is None:
            return self._fail(
                req, "no_instances", unavailable(f"no ready instances to serve mode {self.config.mode!r}")
            )
        roles = PATH_ROLES[path]
        for iid in req.avoid:  # an earlier attempt could not reach it: rank it last, for every request, a while
            self._suspect(iid)
        first_attempt, refusals, tried = req.attempt, [], set()
        for _ in range(2):  # a second pass for instances that registered while the first one failed
            # Offline requests (priority > 0) meet a stricter cap, so online bursts keep some headroom.
            cap = self.config.max_waiting_per_instance if req.priority <= 0 else self.config.max_waiting_offline
            pool = [i for i in self.instances if i.state == READY and i.role in roles and i.waiting < cap]
            adaptive = self.config.mode == "auto"
            for role in roles:  # (adaptive, a split without prefill instances can still go whole on a decode one)
                if not any(i.role == role for i in pool) and not (adaptive and role == "prefill"):
                    return self._fail(
                        req,
                        "overloaded",
                        overloaded(f"every {role} instance has {cap} or more waiting requests; retry later"),
                    )
            cached = await self.policy.cached_tokens(pool, req)
            ranked = self._suspects_last(self.policy.order(pool, req, cached))
            n = len(req.prompt_token_ids)
            plan = choose(path, ranked, n, cached, self.recent.work, self.slo, req.priority, adaptive)
            if plan.retry_after_s is not None and not tried:
                self.paths["refused"] += 1
                return self._fail(req, "slo", slo_refusal(plan, self.slo))
            entry = [i for i in plan.entry if i.instance_id not in tried]
            if req.images and not tried:
                encoders = [i for i in self.instances if i.role == "encoder" and i.state == READY]
                await self.encoders.encode(req, encoders, entry[0] if entry else None)
            decode = plan.decode.instance_id if plan.decode else None
            for info in entry[: self.config.max_attempts - len(refusals)]:
                iid = info.instance_id
                req.attempt, req.decode_instance = first_attempt + len(refusals), decode
                if refusals:
                    self.retries += 1
                new = n - cached.get(iid, 0)
                refusal = await self._forward(iid, req, new, prefill_seconds(info, n, cached.get(iid, 0)))
                if refusal is None:
                    self.routed += 1
                    self.paths[plan.path] += 1
                    taken = [iid, decode] if decode else [iid]
                    log.info("routed", instances=taken, attempt=req.attempt, priority=req.priority, path=plan.path)
                    return RouteReply(req.request_id, instances=taken)
                if not refusal.retry:
                    return self._fail(req, "rejected", refusal.error)
                refusals.append(refusal)
                tried.add(iid)
            if len(refusals) >= self.config.max_attempts or any(r.reason == "overloaded" for r in refusals):
                break
        tried_reasons = ", ".join(r.reason for r in refusals)
        if any(r.reason == "overloaded" for r in refusals):
            return self._fail(req, "overloaded", overloaded(f"every instance tried is overloaded ({tried_reasons})"))
        return self._fail(req, "unavailable", unavailable(f"no instance took the request ({tried_reasons})"))

    async def _forward(self, iid: str, req: GenerateRequest, new: int = 0, prefill_s: float = 0.0) -> Refusal | None:
        """Send `req` to one instance, where `new` prompt tokens are to compute, predicted to take `prefill_s`; None
        when it took it."""
        self.recent.record(iid, new, prefill_s)
        try:
            ack = await bus.request(self.nc, subjects.worker_generate(iid), req, Ack, timeout=self.config.ack_timeout_s)
        except bus.NoResponders:
            refusal = Refusal("no_responders")
        except bus.RequestTimeout:
            refusal = Refusal("timeout")
            await self.nc.publish(subjects.ABORT, AbortRequest(req.request_id).encode())
        except SchemaError as e:
            refusal = Refusal("bad_ack", error=unavailable(str(e)))
        else:
            if ack.ok:
                return None
            err = ApiError.from_wire(ack.error or unavailable("refused").to_wire())
            if err.retriable:
                refusal = Refusal("overloaded" if err.status == 429 else "unavailable", error=err)
            else:
                refusal = Refusal("rejected", retry=False, error=err)
        self.attempt_errors[refusal.reason] += 1
        if refusal.reason in ("no_responders", "timeout"):
            self._suspect(iid)
        log.warning(
            "forward_refused",
            instance=iid,
            attempt=req.attempt,
            reason=refusal.reason,
            error=refusal.error and refusal.error.message,
        )
        return refusal

    def _suspect(self, iid: str) -> None:
        self._suspects[iid] = time.monotonic() + self.config.suspect_s

    def _suspects_last(self, ranked: list[InstanceInfo]) -> list[InstanceInfo]:
        """Instances that recently did not answer go last: tried only if nothing better is left."""
        now = time.monotonic()
        fine = [i for i in ranked if self._suspects.get(i.instance_id, 0.0) <= now]
        return fine + [i for i in ranked if self._suspects.get(i.instance_id, 0.0) > now]

    def _fail(self, req: GenerateRequest, reason: str, err: ApiError) -> RouteReply:
        self.failures[reason] += 1
        log.warning("route_failed", reason=reason, error=err.message, status=err.status)
        return RouteReply(req.request_id, error=err.to_wire())

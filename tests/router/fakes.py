"""The router's test cluster: a registry bucket of its own, fake workers that ack, refuse or stay silent."""

from __future__ import annotations

import uuid

from services.router.config import RouterConfig
from services.router.service import RouterService
from shared import subjects
from shared.instance_view import InstanceView
from shared.messages import Ack, GenerateRequest, InstanceInfo, RouteReply, StreamChunk
from tests.waiting import until

TTL = 1.5


class FakeWorker:
    """Answers GenerateRequests on worker_generate(id): `ack`, `refuse` with `error`, or `silent`."""

    def __init__(self, iid: str, behaviour: str = "ack", error: dict | None = None):
        self.iid, self.behaviour, self.error = iid, behaviour, error
        self.received: list[GenerateRequest] = []

    async def on_msg(self, msg) -> None:
        req = GenerateRequest.decode(msg.data)
        self.received.append(req)
        if self.behaviour == "ack":
            await msg.respond(Ack(req.request_id, self.iid).encode())
        elif self.behaviour == "refuse":
            await msg.respond(Ack(req.request_id, self.iid, ok=False, error=self.error).encode())


class Cluster:
    """A registry bucket of its own, fake workers, and a router reading that bucket."""

    def __init__(self, nc, view: InstanceView):
        self.nc, self.view, self.registry = nc, view, view.registry
        self.tag = uuid.uuid4().hex[:6]
        self.workers: dict[str, FakeWorker] = {}
        self.router: RouterService | None = None
        self._subs: list = []

    def id(self, name: str) -> str:
        return f"{name}-{self.tag}"

    async def add(
        self, name: str, role: str = "colocated", behaviour: str = "ack", error: dict | None = None, **load
    ) -> str:
        """Register an instance (seen by the view when this returns); behaviour "absent" registers it
        without a worker behind it."""
        iid = self.id(name)
        info = InstanceInfo(iid, role, "m", 1, "h", **load)
        await self.registry.heartbeat(info)
        await self.view.wait(lambda: self.view.get(iid) == info)
        if behaviour != "absent":
            worker = self.workers[name] = FakeWorker(iid, behaviour, error)
            self._subs.append(await self.nc.subscribe(subjects.worker_generate(iid), cb=worker.on_msg))
        return iid

    async def start_router(self, **overrides) -> RouterService:
        config = RouterConfig(**{"ack_timeout_s": 0.3, "recent_window_s": 5.0, **overrides})
        self.router = RouterService(config, view=self.view)
        await self.router.start(self.nc)
        return self.router

    async def send(self, req: GenerateRequest | None = None, **kw) -> tuple[RouteReply, list[StreamChunk]]:
        """Request on ROUTER_GENERATE; the reply plus what reached the request's reply subject."""
        req = req or make_request(**kw)
        chunks: list[StreamChunk] = []

        async def on_chunk(msg) -> None:
            chunks.append(StreamChunk.decode(msg.data))

        sub = await self.nc.subscribe(req.reply_subject, cb=on_chunk)
        try:
            reply = RouteReply.decode((await self.nc.request(subjects.ROUTER_GENERATE, req.encode(), timeout=5)).data)
            if reply.error:  # the router publishes an error chunk just before it replies
                await until(lambda: chunks, 5, "no error chunk on the reply subject")
        finally:
            await sub.unsubscribe()
        return reply, chunks

    async def close(self) -> None:
        if self.router is not None:
            await self.router.stop()
        for sub in self._subs:
            await sub.unsubscribe()


def make_request(priority: int = 0) -> GenerateRequest:
    rid = uuid.uuid4().hex[:12]
    return GenerateRequest(rid, [1, 2, 3], {"max_tokens": 4}, reply_subject=f"test.inbox.{rid}", priority=priority)

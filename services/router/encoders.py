"""The router's side of EPD: asking an encoder instance for a request's image embeddings, when that is
predicted to be faster than the worker encoding them (services/router/epd.py). An image left without
embeddings (no encoder, a refusal, an encoder that died) is encoded by the worker: slower, never lost."""

import asyncio
from collections import Counter
from collections.abc import Callable

from nats.aio.client import Client

from services.router.epd import Side, Utilization, rank_encoders, use_encoder
from services.router.policy import RecentForwards
from shared import bus, subjects
from shared.logging import get_logger
from shared.messages import EncodeReply, EncodeRequest, GenerateRequest, InstanceInfo, SchemaError

log = get_logger("xllm.router")


class EncoderGone(Exception):
    """The encoder asked left the registry before it answered."""


class Encoders:
    def __init__(
        self,
        mode: str,
        timeout_s: float,
        suspect: Callable[[str], None],
        suspects_last: Callable[[list[InstanceInfo]], list[InstanceInfo]],
        recent: RecentForwards,
    ):
        """`suspect(iid)` marks an instance that did not answer; `suspects_last` orders such ones last;
        `recent` counts what this router sent each instance lately (encoders and workers alike)."""
        self.nc: Client | None = None  # set when the router starts
        self.mode, self.timeout_s = mode, timeout_s
        self.suspect, self.suspects_last, self.recent = suspect, suspects_last, recent
        self.counts: Counter[str] = Counter()  # requests with images, by where they were encoded
        self._watches: dict[str, list[asyncio.Event]] = {}  # set when that encoder leaves the registry
        self.utilization = Utilization()

    def forget(self, instance_id: str) -> None:
        """The instance left the registry: whoever waits on it as an encoder stops waiting."""
        self.utilization.forget(instance_id)
        for gone in self._watches.pop(instance_id, []):
            gone.set()

    def _side(self, info: InstanceInfo | None) -> Side:
        if info is None:
            return Side(None)
        return Side(info, self.recent.count(info.instance_id), self.utilization.of(info))

    async def encode(self, req: GenerateRequest, encoders: list[InstanceInfo], worker: InstanceInfo | None) -> None:
        """Put an encoder's embedding handles on `req.images`, or leave the images to the worker."""
        ranked = self.suspects_last(rank_encoders(encoders, req.images))
        if not use_encoder(self.mode, len(req.images), self._side(ranked[0] if ranked else None), self._side(worker)):
            self.counts["worker"] += 1
            return
        for encoder in ranked[:2]:
            self.recent.record(encoder.instance_id)
            try:
                reply = await self._ask(encoder.instance_id, EncodeRequest(req.request_id, req.images))
            except (bus.NoResponders, bus.RequestTimeout, SchemaError, EncoderGone) as e:
                self.suspect(encoder.instance_id)
                log.warning("encode_failed", encoder=encoder.instance_id, error=type(e).__name__)
                continue
            if reply.error is None and len(reply.embeddings) == len(req.images):
                for image, handle in zip(req.images, reply.embeddings):
                    image["embedding"] = handle
                self.counts["encoder"] += 1
                return
            log.warning("encode_refused", encoder=encoder.instance_id, error=reply.error)
        self.counts["fallback"] += 1

    async def _ask(self, iid: str, request: EncodeRequest) -> EncodeReply:
        """The encoder's reply; EncoderGone as soon as it leaves the registry (it died mid-request), rather
        than after the whole timeout."""
        gone = asyncio.Event()
        self._watches.setdefault(iid, []).append(gone)
        subject = subjects.encoder_encode(iid)
        ask = asyncio.ensure_future(bus.request(self.nc, subject, request, EncodeReply, timeout=self.timeout_s))
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait([ask, left], return_when=asyncio.FIRST_COMPLETED)
            if not ask.done():
                raise EncoderGone(iid)
            return ask.result()
        finally:
            ask.cancel()
            left.cancel()
            watches = self._watches.get(iid, [])
            if gone in watches:
                watches.remove(gone)
            if not watches:
                self._watches.pop(iid, None)

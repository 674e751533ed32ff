"""EPD: where a request's images are encoded. On an encoder instance (E -> P -> D), or on the worker that
prefills the request (EP -> D, or EPD colocated), decided per request from measured costs, in seconds:

- on an encoder: these images at its measured seconds per image, behind what this router sent it since its
  last heartbeat, stretched by its utilization u as a queue does (1 / (1 - u)), plus a hop;
- on the worker: the same at the worker's seconds per image and utilization, plus the delay it imposes on
  every request the worker holds (running, waiting, or sent since its heartbeat): they all wait while its
  step encodes.

Utilization is busy seconds over wall seconds between two heartbeats (`Utilization`); seconds per image
come from the same counters. Whichever predicts less wins (`auto`); `always` and `never` fix the choice.
Unmeasured costs borrow the other side's figure (same model, likely the same kind of machine); with none
at all the encoder is tried, which measures it. Among encoders, a request goes to the one rendezvous
hashing picks for its first image, so a repeated image meets the encoder that still holds its
embeddings, with no cache directory to keep.
"""

import hashlib
from dataclasses import dataclass

from shared.messages import InstanceInfo

ENCODE_MODES = ("auto", "always", "never")
HOP_S = 0.003  # an EncodeRequest's round trip and reading the embeddings back, a few ms on one host
MAX_UTILIZATION = 0.95  # past this a queue's predicted wait is more noise than signal


def seconds_per_image(info: InstanceInfo | None) -> float | None:
    """Measured from the instance's heartbeat counters; None before it encoded anything."""
    if info is None:
        return None
    images = info.counters.get("images_encoded", 0)
    return info.counters.get("image_encode_seconds", 0.0) / images if images else None


class Utilization:
    """Per instance, the share of the time between its last two heartbeats it spent working."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}  # instance -> (busy seconds, heartbeat time)
        self._value: dict[str, float] = {}

    def of(self, info: InstanceInfo | None) -> float:
        if info is None or "busy_seconds" not in info.counters:
            return 0.0
        busy, at = info.counters["busy_seconds"], info.updated_at
        last = self._last.get(info.instance_id)
        if last is None or at > last[1]:
            if last is not None:
                share = (busy - last[0]) / (at - last[1])
                self._value[info.instance_id] = min(MAX_UTILIZATION, max(0.0, share))
            self._last[info.instance_id] = (busy, at)
        return self._value.get(info.instance_id, 0.0)

    def forget(self, instance_id: str) -> None:
        self._last.pop(instance_id, None)
        self._value.pop(instance_id, None)


@dataclass
class Side:
    """One candidate place to encode: the instance, this router's requests sent it since its heartbeat, and
    its utilization."""

    info: InstanceInfo | None
    recent: int = 0
    utilization: float = 0.0


def use_encoder(mode: str, num_images: int, encoder: Side, worker: Side) -> bool:
    if encoder.info is None or mode == "never":
        return False
    if mode == "always":
        return True
    t_encoder, t_worker = seconds_per_image(encoder.info), seconds_per_image(worker.info)
    if t_encoder is None and t_worker is None:
        return True
    t_encoder = t_worker if t_encoder is None else t_encoder
    t_worker = t_encoder if t_worker is None else t_worker
    encoder_cost = (encoder.recent + num_images) * t_encoder / (1 - encoder.utilization) + HOP_S
    held = worker.recent + (worker.info.running + worker.info.waiting if worker.info else 0)
    worker_cost = num_images * t_worker * (1 / (1 - worker.utilization) + held)
    return encoder_cost < worker_cost


def rank_encoders(encoders: list[InstanceInfo], images: list[dict]) -> list[InstanceInfo]:
    """Encoders in rendezvous-hash order for the request's first image: the same image, the same encoder."""
    key = str(images[0].get("hash", "")) if images else ""
    return sorted(encoders, key=lambda e: hashlib.blake2b(f"{key}/{e.instance_id}".encode(), digest_size=8).digest())

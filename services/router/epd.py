"""EPD: where a request's images are encoded. On an encoder instance (E -> P -> D), or on the worker that
prefills the request (EP -> D, or EPD colocated), decided per request from measured costs:

- an encoder costs its queue plus these images, at its measured seconds per image, plus a hop;
- the worker costs these images at its own seconds per image, paid by every request it holds too
  (running or waiting), since they all wait while its step encodes.

Queues are the last heartbeat's plus what this router sent since (`recent_*`: heartbeats lag a second,
and a burst would otherwise all look free).

Whichever predicts less wins (`auto`); `always` and `never` fix the choice. Unmeasured costs borrow the
other side's figure (same model, likely the same kind of machine); with none at all the encoder is tried, which
measures it. Among encoders, a request goes to the one rendezvous hashing picks for its first image, so a
repeated image meets the encoder that still holds its embeddings, with no cache directory to keep.
"""

import hashlib

from shared.messages import InstanceInfo

ENCODE_MODES = ("auto", "always", "never")
HOP_S = 0.003  # an EncodeRequest's round trip and reading the embeddings back, a few ms on one host


def seconds_per_image(info: InstanceInfo | None) -> float | None:
    """Measured from the instance's heartbeat counters; None before it encoded anything."""
    if info is None:
        return None
    images = info.counters.get("images_encoded", 0)
    return info.counters.get("image_encode_seconds", 0.0) / images if images else None


def use_encoder(
    mode: str,
    num_images: int,
    encoder: InstanceInfo | None,
    worker: InstanceInfo | None,
    recent_encoder: int = 0,
    recent_worker: int = 0,
) -> bool:
    if encoder is None or mode == "never":
        return False
    if mode == "always":
        return True
    t_encoder, t_worker = seconds_per_image(encoder), seconds_per_image(worker)
    if t_encoder is None and t_worker is None:
        return True
    t_encoder = t_worker if t_encoder is None else t_encoder
    t_worker = t_encoder if t_worker is None else t_worker
    encoder_cost = (encoder.waiting + encoder.running + recent_encoder + num_images) * t_encoder + HOP_S
    held = worker.running + worker.waiting if worker else 0
    worker_cost = num_images * t_worker * (1 + held + recent_worker)
    return encoder_cost < worker_cost


def rank_encoders(encoders: list[InstanceInfo], images: list[dict]) -> list[InstanceInfo]:
    """Encoders in rendezvous-hash order for the request's first image: the same image, the same encoder."""
    key = str(images[0].get("hash", "")) if images else ""
    return sorted(encoders, key=lambda e: hashlib.blake2b(f"{key}/{e.instance_id}".encode(), digest_size=8).digest())

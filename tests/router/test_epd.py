"""Where images are encoded (services/router/epd.py): the cost comparison and the encoder's order."""

from services.router.epd import HOP_S, rank_encoders, seconds_per_image, use_encoder
from shared.messages import InstanceInfo


def instance(iid: str, role: str, running: int = 0, waiting: int = 0, images: int = 0, seconds: float = 0.0):
    counters = {"images_encoded": images, "image_encode_seconds": seconds}
    return InstanceInfo(iid, role, "m", 1, "h", running=running, waiting=waiting, counters=counters)


def test_measured_seconds_per_image():
    assert seconds_per_image(instance("e", "encoder", images=4, seconds=0.2)) == 0.05
    assert seconds_per_image(instance("e", "encoder")) is None
    assert seconds_per_image(None) is None


def test_fixed_modes_and_no_encoder():
    encoder, worker = instance("e", "encoder"), instance("w", "prefill")
    assert use_encoder("always", 1, encoder, worker)
    assert not use_encoder("never", 1, encoder, worker)
    assert not use_encoder("always", 1, None, worker)
    assert use_encoder("auto", 1, encoder, worker)  # nothing measured yet: the encoder is tried


def test_a_busy_worker_sends_images_to_the_encoder():
    encoder = instance("e", "encoder", images=10, seconds=1.0)  # 0.1 s an image
    idle = instance("w", "prefill", images=10, seconds=1.0)
    busy = instance("w", "prefill", running=8, images=10, seconds=1.0)
    assert not use_encoder("auto", 2, encoder, idle)  # same speed, no one waiting: the hop is not worth it
    assert use_encoder("auto", 2, encoder, busy)  # 8 sequences would wait 0.2 s each


def test_a_queued_encoder_loses_to_an_idle_worker():
    queued = instance("e", "encoder", waiting=30, images=10, seconds=1.0)
    worker = instance("w", "colocated", running=2, images=10, seconds=1.0)
    assert not use_encoder("auto", 1, queued, worker)  # 31 images ahead vs 1 image x 3 sequences
    assert use_encoder("auto", 1, instance("e", "encoder", images=10, seconds=1.0), worker)


def test_an_unmeasured_side_borrows_the_other_ones_figure():
    encoder = instance("e", "encoder", images=10, seconds=1.0)
    worker = instance("w", "prefill", running=3)
    assert use_encoder("auto", 1, encoder, worker)  # 0.1 + hop < 0.1 x 4
    slow_hop_only = instance("e", "encoder", images=1, seconds=HOP_S)
    assert not use_encoder("auto", 1, slow_hop_only, instance("w", "prefill"))


def test_the_same_image_goes_to_the_same_encoder():
    encoders = [instance(f"e{i}", "encoder") for i in range(4)]
    first = {rank_encoders(encoders, [{"hash": f"{n:064x}"}])[0].instance_id for n in range(40)}
    assert len(first) > 1  # images spread over the encoders
    picks = {rank_encoders(encoders[::-1], [{"hash": "ab" * 32}])[0].instance_id for _ in range(3)}
    assert picks == {rank_encoders(encoders, [{"hash": "ab" * 32}])[0].instance_id}  # order-independent


def test_requests_waiting_on_the_worker_count_like_running_ones():
    encoder = instance("e", "encoder", images=10, seconds=1.0)
    assert use_encoder("auto", 1, encoder, instance("w", "prefill", waiting=2, images=10, seconds=1.0))
    assert not use_encoder("auto", 1, encoder, instance("w", "prefill", images=10, seconds=1.0))


def test_what_the_router_sent_since_the_last_heartbeat_counts_too():
    encoder, worker = instance("e", "encoder", images=10, seconds=1.0), instance("w", "prefill", images=10, seconds=1.0)
    assert use_encoder("auto", 1, encoder, worker, recent_worker=2)
    assert not use_encoder("auto", 1, encoder, worker, recent_encoder=5, recent_worker=2)

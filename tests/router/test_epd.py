"""Where images are encoded (services/router/epd.py): the cost comparison, utilization from heartbeats, and
the encoders' order."""

import pytest

from services.router.epd import HOP_S, MAX_UTILIZATION, Side, Utilization, rank_encoders, seconds_per_image, use_encoder
from shared.messages import InstanceInfo


def instance(iid: str, role: str, running=0, waiting=0, images=0, seconds=0.0, busy=None, at=0.0) -> InstanceInfo:
    counters = {"images_encoded": images, "image_encode_seconds": seconds}
    if busy is not None:
        counters["busy_seconds"] = busy
    return InstanceInfo(iid, role, "m", 1, "h", running=running, waiting=waiting, counters=counters, updated_at=at)


def encoder(**kw) -> Side:
    return Side(instance("e", "encoder", images=10, seconds=1.0), **kw)  # 0.1 s an image


def worker(running=0, waiting=0, **kw) -> Side:
    return Side(instance("w", "prefill", running, waiting, images=10, seconds=1.0), **kw)


def test_measured_seconds_per_image():
    assert seconds_per_image(instance("e", "encoder", images=4, seconds=0.2)) == 0.05
    assert seconds_per_image(instance("e", "encoder")) is None
    assert seconds_per_image(None) is None


def test_fixed_modes_and_no_encoder():
    fresh_encoder, fresh_worker = Side(instance("e", "encoder")), Side(instance("w", "prefill"))
    assert use_encoder("always", 1, fresh_encoder, fresh_worker)
    assert not use_encoder("never", 1, fresh_encoder, fresh_worker)
    assert not use_encoder("always", 1, Side(None), fresh_worker)
    assert use_encoder("auto", 1, fresh_encoder, fresh_worker)  # nothing measured yet: the encoder is tried


def test_an_idle_worker_keeps_its_images_and_a_loaded_one_sends_them_away():
    assert not use_encoder("auto", 2, encoder(), worker())  # same speed, nobody waiting: the hop is not worth it
    assert use_encoder("auto", 2, encoder(), worker(running=1))  # its sequence would wait 0.2 s
    assert use_encoder("auto", 2, encoder(), worker(recent=1))  # sent since its heartbeat: the same
    assert use_encoder("auto", 1, encoder(), worker(utilization=0.5))  # 0.2 s there against 0.1 s + hop


def test_a_busy_encoder_loses_to_an_idle_worker():
    assert not use_encoder("auto", 1, encoder(recent=3), worker())
    assert not use_encoder("auto", 1, encoder(utilization=0.9), worker(running=2))  # 1 s against 0.3 s


def test_an_unmeasured_side_borrows_the_other_ones_figure():
    assert use_encoder("auto", 1, encoder(), Side(instance("w", "prefill", running=3)))  # 0.1 + hop < 0.1 x 4
    hop_only = Side(instance("e", "encoder", images=1, seconds=HOP_S))
    assert not use_encoder("auto", 1, hop_only, Side(instance("w", "prefill")))


def test_utilization_is_busy_seconds_over_the_time_between_heartbeats():
    u = Utilization()
    assert u.of(instance("w", "prefill", busy=10.0, at=100.0)) == 0.0  # one heartbeat: nothing to compare
    assert u.of(instance("w", "prefill", busy=10.6, at=101.0)) == pytest.approx(0.6)
    assert u.of(instance("w", "prefill", busy=10.6, at=101.0)) == pytest.approx(0.6)  # the same heartbeat again
    assert u.of(instance("w", "prefill", busy=12.6, at=102.0)) == MAX_UTILIZATION  # capped
    assert u.of(instance("x", "prefill")) == 0.0  # reports no busy time
    u.forget("w")
    assert u.of(instance("w", "prefill", busy=20.0, at=110.0)) == 0.0


def test_the_same_image_goes_to_the_same_encoder():
    encoders = [instance(f"e{i}", "encoder") for i in range(4)]
    first = {rank_encoders(encoders, [{"hash": f"{n:064x}"}])[0].instance_id for n in range(40)}
    assert len(first) > 1  # images spread over the encoders
    picks = {rank_encoders(encoders[::-1], [{"hash": "ab" * 32}])[0].instance_id for _ in range(3)}
    assert picks == {rank_encoders(encoders, [{"hash": "ab" * 32}])[0].instance_id}  # order-independent

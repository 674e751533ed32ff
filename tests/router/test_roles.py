"""Switching mixed instances between the prefill and decode pools: on pressure, with hysteresis."""

from services.router.adaptive import Slo
from services.router.roles import RoleSwitcher
from shared.cost_model import CostModel
from shared.messages import InstanceInfo

COST = CostModel(step=0.03, seq=0.001, token=0.0005, attention=1e-7, context=1e-7).to_dict()
SLO = Slo(ttft_s=2.0, tpot_s=0.1)


def instance(iid: str, role: str, mixed: bool = True, state: str = "ready", **load) -> InstanceInfo:
    roles = ["prefill", "decode"] if mixed else []
    return InstanceInfo(iid, role, "m", 1, "h", state=state, cost=COST, load=load, roles=roles)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_decode_pressure_moves_the_prefill_instance_with_the_shortest_queue():
    crowded = {"decode_seqs": 64, "decode_context_tokens": 64 * 600}  # 30 + 64 + 64 * 1 + 3.8 ms > 100 ms
    pool = [
        instance("p1", "prefill", prefill_seconds=0.5),
        instance("p2", "prefill", prefill_seconds=0.1),
        instance("d1", "decode", **crowded),
    ]
    switch = RoleSwitcher(SLO).look(pool)
    assert (switch.instance_id, switch.role) == ("p2", "decode")


def test_prefill_pressure_moves_the_decode_instance_with_the_fewest_decodes():
    pool = [
        instance("p1", "prefill", prefill_seconds=5.0),
        instance("d1", "decode", decode_seqs=3, decode_context_tokens=300),
        instance("d2", "decode", decode_seqs=1, decode_context_tokens=100),
    ]
    switch = RoleSwitcher(SLO).look(pool)
    assert (switch.instance_id, switch.role) == ("d2", "prefill")


def test_no_switch_without_room_to_spare_on_the_giving_side():
    # The prefill queues are past the target, but the one other decode instance is near the TPOT target.
    pool = [
        instance("p1", "prefill", prefill_seconds=5.0),
        instance("d1", "decode", decode_seqs=40, decode_context_tokens=40 * 300),
        instance("d2", "decode", decode_seqs=1, decode_context_tokens=100),
    ]
    assert RoleSwitcher(SLO).look(pool) is None


def test_a_role_keeps_its_last_instance_and_fixed_instances_never_move():
    crowded = {"decode_seqs": 64, "decode_context_tokens": 64 * 600}
    assert RoleSwitcher(SLO).look([instance("p1", "prefill"), instance("d1", "decode", **crowded)]) is None
    fixed = [instance("p1", "prefill", mixed=False), instance("p2", "prefill", mixed=False)]
    assert RoleSwitcher(SLO).look([*fixed, instance("d1", "decode", **crowded)]) is None


def test_dwell_and_interval_keep_it_from_flapping():
    clock = Clock()
    switcher = RoleSwitcher(SLO, interval_s=1.0, dwell_s=10.0, clock=clock)
    p_busy = [instance("p1", "prefill", mixed=False, prefill_seconds=5.0)]
    quiet = {"decode_seqs": 0, "decode_context_tokens": 0}
    pool = [*p_busy, instance("d1", "decode", **quiet), instance("d2", "decode", **quiet)]
    first = switcher.look(pool)
    assert first.role == "prefill" and first.instance_id in ("d1", "d2")
    moved = first.instance_id
    assert switcher.look(pool) is None  # within the interval: not even looked at
    # Now the moved instance is a prefill one, and decodes crowd the other: it would move back, but dwells.
    crowded = {"decode_seqs": 64, "decode_context_tokens": 64 * 600}
    other = "d2" if moved == "d1" else "d1"
    after = [*p_busy, instance(moved, "prefill"), instance(other, "decode", **crowded)]
    clock.now = 5.0
    assert switcher.look(after) is None  # `moved` dwells (p1 is not switchable)
    clock.now = 11.0
    p_idle = [instance("p1", "prefill", mixed=False, prefill_seconds=0.0), instance(moved, "prefill")]
    back = switcher.look([*p_idle, instance(other, "decode", **crowded)])
    assert back is not None and back.role == "decode"


def test_nothing_moves_without_targets_or_before_the_instances_predict():
    pool = [
        instance("p1", "prefill", prefill_seconds=5.0),
        instance("d1", "decode"),
        instance("d2", "decode"),
    ]
    assert RoleSwitcher(Slo()).look(pool) is None
    pool[1].cost = {}
    assert RoleSwitcher(SLO).look(pool) is None

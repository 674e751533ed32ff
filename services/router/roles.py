"""Role switching: the router moves mixed instances (services/mixed) between the prefill and the decode pool
from predicted SLO attainment, with hysteresis, as xLLM's service layer flips its instances.

At most every `interval_s`, from the costs and load the instances report (shared/cost_model.py):
- decode pressure: no decode instance keeps the TPOT target (its next step, predicted from its batch, is past
  it), while the prefill pool, without the switched instance, keeps the TTFT target with room to spare (its
  shortest prefill queue is under `SPARE` x the target) -> the switchable prefill instance with the shortest
  queue becomes a decode instance (only that one: moving a busy instance would carry its work along);
- prefill pressure: every prefill instance's queue is past the TTFT target, while the decode pool, without the
  switched instance, keeps the TPOT target with room to spare -> the switchable decode instance with the
  lightest batch becomes a prefill instance (xLLM flips decode instances back when idle).
The spare-room thresholds and a dwell time (`dwell_s`: an instance switched lately stays) keep it from
flapping. A role never loses its last instance, one switch is made per look, and instances that predict nothing
yet are left alone. Without SLO targets nothing is switched (there is no target to trade between the pools);
the per-request path choice still moves prefill overflow onto decode instances (services/router/adaptive.py).
"""

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client

from services.router.adaptive import Slo
from shared import bus, subjects
from shared.cost_model import CostModel
from shared.logging import get_logger
from shared.messages import Ack, InstanceInfo, RoleChange, SchemaError

log = get_logger("xllm.router")

SPARE = 0.5  # the pool that gives an instance up must be under this share of its target without it


@dataclass
class Switch:
    instance_id: str
    role: str
    why: str


def decode_step_s(info: InstanceInfo) -> float | None:
    """The instance's next decode step, predicted; None when it has no model yet."""
    model = CostModel.from_dict(info.cost)
    if model is None:
        return None
    return model.decode_step(int(info.load.get("decode_seqs", 0)), int(info.load.get("decode_context_tokens", 0)))


def queue_s(info: InstanceInfo) -> float | None:
    """Prefill work queued on the instance, predicted; None when it has no model yet."""
    return float(info.load.get("prefill_seconds", 0.0)) if CostModel.from_dict(info.cost) else None


class RoleSwitcher:
    def __init__(
        self, slo: Slo, interval_s: float = 1.0, dwell_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ):
        self.slo, self.interval_s, self.dwell_s, self.clock = slo, interval_s, dwell_s, clock
        self.switched_at: dict[str, float] = {}
        self.switches: Counter[str] = Counter()  # switches made, by the role switched to
        self._looked_at = -float("inf")

    def due(self) -> bool:
        """Whether a look now would look at all (targets set, `interval_s` since the last): the router asks first,
        so that most requests do not copy the instance list for nothing."""
        no_targets = self.slo.ttft_s is None and self.slo.tpot_s is None
        return not no_targets and self.clock() - self._looked_at >= self.interval_s

    def look(self, instances: list[InstanceInfo]) -> Switch | None:
        """The switch to make now, if any (and remember it was made)."""
        if not self.due():
            return None
        now = self._looked_at = self.clock()
        switch = self._decide([i for i in instances if i.state == "ready"], now)
        if switch is not None:
            self.switched_at[switch.instance_id] = now
        return switch

    def forget(self, instance_id: str) -> None:
        self.switched_at.pop(instance_id, None)

    async def apply(self, nc: Client, switch: Switch, timeout_s: float = 2.0) -> bool:
        """Tell the instance to switch; False when it did not (it stays as it was: nothing is lost)."""
        change = RoleChange(switch.instance_id, switch.role)
        try:
            ack = await bus.request(nc, subjects.worker_role(switch.instance_id), change, Ack, timeout=timeout_s)
        except (bus.BusError, SchemaError) as e:
            ack = Ack("", switch.instance_id, False, {"message": f"{type(e).__name__}: {e}"})
        if not ack.ok:
            log.warning("role_switch_failed", instance=switch.instance_id, role=switch.role, error=ack.error)
            return False
        self.switches[switch.role] += 1
        log.info("role_switch", instance=switch.instance_id, role=switch.role, why=switch.why)
        return True

    def _decide(self, ready: list[InstanceInfo], now: float) -> Switch | None:
        prefills = [i for i in ready if i.role == "prefill"]
        decodes = [i for i in ready if i.role == "decode"]
        if not prefills or not decodes:
            return None
        steps = {i.instance_id: decode_step_s(i) for i in decodes}
        queues = {i.instance_id: queue_s(i) for i in prefills}
        if None in steps.values() or None in queues.values():
            return None

        def movable(pool: list[InstanceInfo]) -> list[InstanceInfo]:
            return [
                i
                for i in pool
                if set(i.roles) >= {"prefill", "decode"}
                and now - self.switched_at.get(i.instance_id, -float("inf")) >= self.dwell_s
            ]

        tpot, ttft = self.slo.tpot_s, self.slo.ttft_s
        # Only the least busy instance of a pool may go: moving a busy one would carry its work into the other.
        if tpot is not None and len(prefills) > 1 and min(steps.values()) > tpot and movable(prefills):
            cand = min(movable(prefills), key=lambda i: queues[i.instance_id])
            rest = [q for iid, q in queues.items() if iid != cand.instance_id]
            if ttft is None or min(rest) <= SPARE * ttft:
                return Switch(cand.instance_id, "decode", f"decode steps {min(steps.values()) * 1000:.0f} ms")
        if ttft is not None and len(decodes) > 1 and min(queues.values()) > ttft and movable(decodes):
            cand = min(movable(decodes), key=lambda i: steps[i.instance_id])
            rest = [s for iid, s in steps.items() if iid != cand.instance_id]
            if tpot is None or min(rest) <= SPARE * tpot:
                return Switch(cand.instance_id, "prefill", f"prefill queues {min(queues.values()):.1f} s")
        return None

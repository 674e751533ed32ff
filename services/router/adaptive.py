"""Workload-adaptive PD: per request, split (prefill on a prefill instance, decode on a decode instance) or
whole on one decode-capable instance, from what each would cost; and SLO-aware admission.

Predictions come from the step-cost model each worker fits to its own steps and reports in its heartbeat
(shared/cost_model.py), and the load it reports (decodes running, prompt tokens queued), plus the prompts this
router sent it since (which the heartbeat does not show yet):

- TTFT on an instance: the prefill work queued ahead of the prompt, the prompt's own work (its uncached
  tokens), and every step it takes carrying the decodes the instance runs.
- Whole on a decode-capable instance also delays each of its running decodes by the prompt's prefill work:
  the cost of that choice is TTFT + decodes x that work (the delay imposed on everyone, as EPD's choice
  counts it); split costs its TTFT, and the prompt's KV moving while the prefill instance computes it.

Both options are priced by the prefill instance's model (instances of one deployment differ by fit noise, not
by hardware), and split is kept unless whole is cheaper by MARGIN (so a tie keeps prefill and decode apart).
With SLOs,
a choice that meets them beats one that does not, and whole is refused when its steps would exceed the TPOT
target. An online request whose best predicted TTFT is past the TTFT target x `reject_factor` gets 429
with Retry-After; offline requests wait instead. An instance without a model yet (workers measure themselves
before serving, so only a worker of another version) predicts nothing: then the fixed rule holds (split
whenever both roles are up), and nothing is refused.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from services.router.policy import COLOCATED, DISAGGREGATED
from shared.cost_model import CostModel
from shared.errors import ApiError, overloaded
from shared.messages import InstanceInfo

MARGIN = 0.1  # whole must be this much cheaper than split to be chosen


@dataclass
class Slo:
    """Targets in seconds; None: no target."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    reject_factor: float = 1.0  # refuse an online request whose predicted TTFT exceeds ttft_s x this

    @classmethod
    def from_ms(cls, ttft_ms: float | None, tpot_ms: float | None, reject_factor: float = 1.0) -> "Slo":
        return cls(*(None if ms is None else ms / 1000 for ms in (ttft_ms, tpot_ms)), reject_factor)


@dataclass
class Estimate:
    """A prompt placed on one instance: its predicted TTFT, the per-step time of the instance's decodes while
    it prefills, and the seconds of delay it imposes on them in all."""

    instance: InstanceInfo
    ttft_s: float
    step_s: float
    imposed_s: float

    @property
    def cost(self) -> float:
        return self.ttft_s + self.imposed_s


def estimate(
    info: InstanceInfo,
    prompt_tokens: int,
    cached_tokens: int = 0,
    recent_tokens: int = 0,
    recent_s: float = 0.0,
    model: CostModel | None = None,
) -> Estimate | None:
    """The prompt on `info`, priced by `model` (default: the instance's own); None when there is no model yet."""
    model = model or CostModel.from_dict(info.cost)
    if model is None:
        return None
    load = info.load
    decodes, context = int(load.get("decode_seqs", 0)), int(load.get("decode_context_tokens", 0))
    budget = max(1, int(load.get("max_batched_tokens", 2048)) - decodes)
    new = max(1, prompt_tokens - cached_tokens)
    own = model.prefill_work(new, cached_tokens)
    ahead_tokens = int(load.get("prefill_tokens", 0)) + recent_tokens
    ahead_s = float(load.get("prefill_seconds", 0.0)) + recent_s
    steps = math.ceil((ahead_tokens + new) / budget)
    carry = model.step + model.seq + model.decode_step(decodes, context)  # each step's cost beside the prompt
    own_steps = math.ceil(new / budget)
    return Estimate(
        info,
        ttft_s=ahead_s + own + steps * carry,
        step_s=model.decode_step(decodes, context) + own / own_steps,
        imposed_s=decodes * own,
    )


def meets(e: Estimate, slo: Slo, whole: bool) -> bool:
    ttft_ok = slo.ttft_s is None or e.ttft_s <= slo.ttft_s
    tpot_ok = not whole or slo.tpot_s is None or e.instance.load.get("decode_seqs", 0) == 0 or e.step_s <= slo.tpot_s
    return ttft_ok and tpot_ok


def prefer_whole(split: Estimate | None, whole: Estimate | None, slo: Slo) -> bool:
    """Whether the prompt goes whole on `whole`'s instance rather than split via `split`'s prefill instance."""
    if whole is None or split is None:
        return False  # nothing known of one side: the fixed rule
    split_ok, whole_ok = meets(split, slo, False), meets(whole, slo, True)
    if split_ok != whole_ok:
        return whole_ok
    return whole.cost < split.cost * (1 - MARGIN)


def hopeless(best: Estimate | None, slo: Slo, priority: int) -> float | None:
    """Seconds to wait before retrying when an online request cannot meet its TTFT target; else None."""
    if best is None or slo.ttft_s is None or priority > 0 or best.ttft_s <= slo.ttft_s * slo.reject_factor:
        return None
    return best.ttft_s - slo.ttft_s


@dataclass
class Plan:
    """Where a request goes: the path, its entry instances best first, the decode instance of a split, the
    estimate for the first entry instance, and when it must be refused, the seconds to retry after."""

    path: str
    entry: list[InstanceInfo]
    decode: InstanceInfo | None = None
    estimate: Estimate | None = None
    retry_after_s: float | None = None


def plan(
    path: str,
    ranked: list[InstanceInfo],
    prompt_tokens: int,
    cached: dict[str, int],
    recent: Callable[[str], tuple[int, float]],
    slo: Slo,
    priority: int = 0,
    adaptive: bool = True,
) -> Plan:
    """The route for a prompt over `ranked` (the policy's order), on `path` (choose_path's); with `adaptive`,
    a split may become whole on a decode-capable instance. `recent(iid)`: tokens and seconds sent it lately."""

    def on(info: InstanceInfo | None, model: CostModel | None = None) -> Estimate | None:
        if info is None:
            return None
        cached_here = cached.get(info.instance_id, 0)
        return estimate(info, prompt_tokens, cached_here, *recent(info.instance_id), model=model)

    if path == DISAGGREGATED:
        prefills = [i for i in ranked if i.role == "prefill"]
        # Both options priced by one model (the prefill instance's): instances of one deployment run the same
        # model on the same kind of machine, so their fits differ by measurement noise, which must not decide.
        model = CostModel.from_dict(prefills[0].cost) if prefills else None
        decode = next((i for i in ranked if i.role == "decode"), None)
        wholes = [i for i in ranked if i.role in ("colocated", "decode")]
        split, whole = on(prefills[0] if prefills else None), on(wholes[0] if wholes else None, model)
        if adaptive and wholes and (not prefills or prefer_whole(split, whole, slo)):
            return _admitted(Plan(COLOCATED, wholes, None, whole), slo, priority)
        return _admitted(Plan(DISAGGREGATED, prefills, decode, split), slo, priority)
    entry = [i for i in ranked if i.role == "colocated"]
    return _admitted(Plan(COLOCATED, entry, None, on(entry[0] if entry else None)), slo, priority)


def _admitted(p: Plan, slo: Slo, priority: int) -> Plan:
    p.retry_after_s = hopeless(p.estimate, slo, priority)
    return p


def prefill_seconds(info: InstanceInfo, prompt_tokens: int, cached_tokens: int) -> float:
    """The prompt's own prefill work on `info` by its cost model (0 when it has none yet)."""
    model = CostModel.from_dict(info.cost)
    new = max(1, prompt_tokens - cached_tokens)
    return model.prefill_work(new, cached_tokens) if model else 0.0


def slo_refusal(p: Plan, slo: Slo) -> ApiError:
    """The 429 for a plan `hopeless` refused, with Retry-After."""
    retry = math.ceil(p.retry_after_s or 0)
    error = overloaded(
        f"the predicted time to first token ({p.estimate.ttft_s * 1000:.0f} ms) is past the "
        f"{slo.ttft_s * 1000:.0f} ms target; retry in {retry} s",
        "slo_unattainable",
    )
    error.retry_after = retry
    return error

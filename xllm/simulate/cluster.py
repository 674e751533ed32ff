"""The discrete-event loop: requests arrive, the router places them, instances step, KV moves, requests finish.

The router is the real one: `services.router.service.RouterService.route` (choose_path, the waiting cap, the
least-loaded policy's order with its RecentForwards, adaptive.plan and its SLO refusals) runs unchanged on
a simulated clock; only `_forward` is replaced, to hand the request to a simulated instance instead of the
bus (it records the forward in RecentForwards first, as the real one does). The coroutine never waits on
anything, so it is driven without an event loop. Before each request, as the real router does on each
message, its RoleSwitcher looks at the instances and may switch a mixed one (which then heartbeats at once,
as services/mixed does). The router sees what the instances' last heartbeats said (every `heartbeat_s`,
each at its own phase) plus what it sent them since.

A split request: the prefill instance computes the prompt and samples the first token (its TTFT), then its
KV travels (latency + bytes per token x prompt tokens / bandwidth; defaults: this machine's shared-memory
copy, docs/performance.md) and the decode instance continues with the KV in place. A whole request runs on
one instance. Requests the router refuses (the TTFT target, full queues) fail; so does what is left
unfinished `drain_s` after the last arrival.
"""

import heapq
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from services.router.config import RouterConfig
from services.router.policy import LeastLoadedPolicy, RecentForwards
from services.router.roles import RoleSwitcher, Switch
from services.router.service import Refusal, RouterService
from shared.cost_model import CostModel
from shared.messages import GenerateRequest, InstanceInfo, RouteReply
from xllm.simulate.instance import SimInstance
from xllm.simulate.steps import Seq
from xllm.simulate.trace import TraceRequest

POLICIES = ("colocated", "split", "adaptive")
MODES = {"colocated": "colocated", "split": "disaggregated", "adaptive": "auto"}
ARRIVE, STEP, KV, BEAT = range(4)


@dataclass
class ClusterConfig:
    policy: str = "colocated"  # colocated | split (static PD, `prefill_share` of instances) | adaptive (mixed)
    instances: int = 8
    prefill_share: float = 0.5  # split: the P share of P:D; adaptive: the initial one
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_reject_factor: float = 1.0
    max_batched_tokens: int = 2048
    max_num_seqs: int = 64
    kv_tokens: int = 131072  # KV capacity per instance, in tokens
    block_size: int = 16
    heartbeat_s: float = 1.0
    recent_window_s: float = 1.0
    max_waiting: int = 64  # the router's --max-waiting-per-instance
    kv_bytes_per_token: int = 46080  # SmolLM2, fp32
    kv_bandwidth: float = 4.5e9  # bytes/s
    kv_latency_s: float = 0.004
    dwell_s: float = 10.0  # the role switcher's
    drain_s: float = 600.0
    seed: int = 0

    def prefill_count(self) -> int:
        return max(1, min(self.instances - 1, round(self.instances * self.prefill_share)))


@dataclass
class Record:
    """One request: when it arrived, got its first token and finished (seconds), or why it failed."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    path: str = ""  # "whole" | "split"
    first: float | None = None
    finish: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.finish is None:
            return None
        return (self.finish - self.first) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass
class SimResult:
    records: list[Record]
    duration_s: float  # first arrival to the last finish (or the last arrival)
    switches: Counter = field(default_factory=Counter)  # by the role switched to
    preemptions: int = 0
    steps: int = 0
    events: int = 0


class _View:
    """What RouterService reads its instances from (shared/instance_view.py's one method it uses)."""

    def __init__(self, infos: list[InstanceInfo]):
        self.infos = infos

    def instances(self) -> list[InstanceInfo]:
        return self.infos


class SimRouter(RouterService):
    """The real router on the simulated clock; `_forward` hands the request to `accept` instead of the bus."""

    def __init__(self, config: RouterConfig, view: _View, clock: Any, seed: int):
        recent = RecentForwards(config.recent_window_s, clock=clock)
        super().__init__(config, view=view, policy=LeastLoadedPolicy(recent, rng=random.Random(seed)))
        self.recent = recent  # the policy's, so plan() and the ranking see the same forwards
        self.switcher = RoleSwitcher(self.slo, clock=clock)

    async def _forward(self, iid: str, req: GenerateRequest, new: int = 0, prefill_s: float = 0.0) -> Refusal | None:
        self.recent.record(iid, new, prefill_s)
        return None


def drive(coro: Any) -> Any:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the router waited on something: the simulator cannot drive it")


class Cluster:
    def __init__(self, model: CostModel, config: ClusterConfig):
        if config.policy not in POLICIES:
            raise ValueError(f"policy {config.policy!r}: use one of {', '.join(POLICIES)}")
        if config.policy != "colocated" and config.instances < 2:
            raise ValueError(f"the {config.policy} policy needs at least 2 instances")
        self.config, self.model, self.now = config, model, 0.0
        self.rng = random.Random(config.seed)
        p = config.prefill_count() if config.policy != "colocated" else 0
        self.instances = [
            SimInstance(
                f"sim-{i}",
                "colocated" if config.policy == "colocated" else ("prefill" if i < p else "decode"),
                model,
                config.max_batched_tokens,
                config.max_num_seqs,
                config.kv_tokens,
                config.block_size,
                switchable=config.policy == "adaptive",
            )
            for i in range(config.instances)
        ]
        self.index = {inst.instance_id: k for k, inst in enumerate(self.instances)}
        self.infos = [inst.info(0.0) for inst in self.instances]
        router_config = RouterConfig(
            mode=MODES[config.policy],
            recent_window_s=config.recent_window_s,
            max_waiting_per_instance=config.max_waiting,
            max_waiting_offline=min(32, config.max_waiting),
            slo_ttft_ms=config.slo_ttft_ms,
            slo_tpot_ms=config.slo_tpot_ms,
            slo_reject_factor=config.slo_reject_factor,
        )
        self.router = SimRouter(router_config, _View(self.infos), lambda: self.now, config.seed)
        self.router.switcher.dwell_s = config.dwell_s
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._n = 0

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, kind, a, b))

    def _schedule(self, k: int, end: float | None) -> None:
        if end is not None:
            self._push(end, STEP, k, self.instances[k].version)

    def transfer_s(self, tokens: int) -> float:
        c = self.config
        return c.kv_latency_s + c.kv_bytes_per_token * tokens / c.kv_bandwidth

    def run(self, trace: list[TraceRequest]) -> SimResult:
        c = self.config
        records = [Record(r.arrival, r.prompt_tokens, r.output_tokens) for r in trace]
        decode_at: dict[int, int] = {}  # a split request's decode instance
        for i, r in enumerate(trace):
            self._push(r.arrival, ARRIVE, i)
        for k in range(len(self.instances)):
            self._push(self.rng.random() * c.heartbeat_s, BEAT, k)
        last_arrival = trace[-1].arrival if trace else 0.0
        open_requests, events = len(trace), 0
        while self._heap and open_requests > 0:
            t, _, kind, a, b = heapq.heappop(self._heap)
            if t > last_arrival + c.drain_s:
                break
            self.now = t
            events += 1
            if kind == BEAT:
                self.infos[a] = self.instances[a].info(t)
                self._push(t + c.heartbeat_s, BEAT, a)
            elif kind == STEP:
                inst = self.instances[a]
                if inst.version != b:
                    continue  # its step was cut short (an arrival): a newer event stands
                for what, seq in inst.end_step(t):
                    rec = records[seq.rid]
                    if what == "first":
                        rec.first = t if rec.first is None else rec.first
                    elif what == "done":
                        rec.finish = t
                        open_requests -= 1
                    else:  # handoff: the KV goes to the decode instance
                        self._push(t + self.transfer_s(seq.prompt), KV, decode_at.pop(seq.rid), seq)
                self._schedule(a, inst.begin(t))
            elif kind == KV:
                out = records[b.rid].output_tokens
                seq = Seq(b.rid, b.prompt, out, tokens=b.prompt + 1, computed=b.prompt, generated=1)
                self._schedule(a, self.instances[a].add(seq, t))
            else:
                open_requests -= self._arrive(a, trace[a], records[a], decode_at)
        for rec in records:
            if rec.error is None and rec.finish is None:
                rec.error = "unfinished"
        ends = [r.finish for r in records if r.finish is not None] + [last_arrival]
        start = trace[0].arrival if trace else 0.0
        return SimResult(
            records,
            max(ends) - start,
            Counter(self.router.switcher.switches),
            sum(i.preemptions for i in self.instances),
            sum(i.steps for i in self.instances),
            events,
        )

    def _arrive(self, rid: int, r: TraceRequest, rec: Record, decode_at: dict[int, int]) -> int:
        """Route one request (as RouterService._on_message + route would); 1 when it is over at once (failed)."""
        switch = self.router.switcher.look(self.infos)
        if switch is not None:
            self._switch(switch)
        if r.prompt_tokens + r.output_tokens > self.config.kv_tokens:
            rec.error = "too_long"
            return 1
        req = GenerateRequest(str(rid), [0] * r.prompt_tokens, {}, "sim")
        reply: RouteReply = drive(self.router.route(req))
        if reply.error:
            rec.error = reply.error.get("code") or "unavailable"
            return 1
        entry = self.index[reply.instances[0]]
        if len(reply.instances) > 1:
            rec.path = "split"
            if r.output_tokens > 1:
                decode_at[rid] = self.index[reply.instances[1]]
            seq = Seq(rid, r.prompt_tokens, 1, handoff=r.output_tokens > 1)
        else:
            rec.path = "whole"
            seq = Seq(rid, r.prompt_tokens, r.output_tokens)
        self._schedule(entry, self.instances[entry].add(seq, self.now))
        return 0

    def _switch(self, switch: Switch) -> None:
        """What RoleSwitcher.apply and a mixed worker do: it acts as the new role and heartbeats at once."""
        k = self.index[switch.instance_id]
        self.instances[k].role = switch.role
        self.infos[k] = self.instances[k].info(self.now)
        self.router.switcher.switches[switch.role] += 1


def simulate(trace: list[TraceRequest], model: CostModel, config: ClusterConfig) -> SimResult:
    """One run of `trace` on a cluster of `config`."""
    return Cluster(model, config).run(trace)

"""A tiny Prometheus registry: counters, gauges and histograms with labels, rendered in text format 0.0.4.

    registry = Registry()
    requests = registry.counter("xllm_requests_total", "HTTP requests", labels=("status",))
    requests.labels(status="200").inc()
    ttft = registry.histogram("xllm_ttft_seconds", "time to first token", buckets=(0.01, 0.1, 1))
    ttft.observe(0.05)
    text = registry.render()

Single-threaded by design (every service is one asyncio loop): no locks.
"""

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets (seconds) covering sub-millisecond hand-offs to minute-long generations.
M = TypeVar("M", bound="_Metric")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Metric:
    type_name = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: object, **by_name: object) -> Any:
        """The child for these label values (positional, or by name); created on first use."""
        if by_name:
            if values or set(by_name) != set(self.label_names):
                raise ValueError(f"{self.name}: expected labels {self.label_names}, got {sorted(by_name)}")
            values = tuple(by_name[n] for n in self.label_names)
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected {len(self.label_names)} label values, got {len(values)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _self_child(self) -> Any:
        if self.label_names:
            raise ValueError(f"{self.name} has labels {self.label_names}: call .labels(...) first")
        return self.labels()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        raise NotImplementedError


class _Value:
    __slots__ = ("fn", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Read the value from `fn` at render time (for gauges that mirror some state)."""
        self.fn = fn

    def get(self) -> float:
        return float(self.fn()) if self.fn is not None else self.value


class Counter(_Metric):
    type_name = "counter"

    def _new_child(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        self._self_child().inc(amount)

    def get(self) -> float:
        return self._self_child().get()

    def samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        for key, child in self._children.items():
            yield self.name, dict(zip(self.label_names, key)), child.get()


class Gauge(Counter):
    type_name = "gauge"

    def inc(self, amount: float = 1.0) -> None:
        self._self_child().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._self_child().dec(amount)

    def set(self, value: float) -> None:
        self._self_child().set(value)

    def set_function(self, fn: Callable[[], float]) -> None:
        self._self_child().set_function(fn)


class _HistogramValue:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break


class Histogram(_Metric):
    type_name = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ):
        super().__init__(name, help, labels)
        if "le" in self.label_names:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and non-empty")
        self.buckets = tuple(b for b in bounds if b != math.inf)

    def _new_child(self) -> _HistogramValue:
        return _HistogramValue(self.buckets)

    def observe(self, value: float) -> None:
        self._self_child().observe(value)

    def samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        for key, child in self._children.items():
            labels = dict(zip(self.label_names, key))
            cumulative = 0
            for bound, n in zip(self.buckets, child.counts):
                cumulative += n
                yield f"{self.name}_bucket", {**labels, "le": _fmt(bound)}, cumulative
            yield f"{self.name}_bucket", {**labels, "le": "+Inf"}, child.count
            yield f"{self.name}_sum", labels, child.sum
            yield f"{self.name}_count", labels, child.count


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labels))

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    def _add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """Every metric in Prometheus text exposition format. Unlabelled metrics show 0 before first use."""
        lines: list[str] = []
        for m in self._metrics.values():
            if not m.label_names and not m._children:
                m.labels()
            lines.append(f"# HELP {m.name} {_escape_help(m.help)}")
            lines.append(f"# TYPE {m.name} {m.type_name}")
            for name, labels, value in m.samples():
                if labels:
                    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                    lines.append(f"{name}{{{body}}} {_fmt(value)}")
                else:
                    lines.append(f"{name} {_fmt(value)}")
        return "\n".join(lines) + "\n"


def stats_text(prefix: str, stats: dict[str, Any]) -> str:
    """A service's stats() dict as Prometheus gauges: numbers as they are, dicts of numbers with a
    `kind` label (their keys appear as they happen, so they are read at scrape time)."""
    lines: list[str] = []
    for key, value in stats.items():
        name = f"{prefix}_{key}"
        lines.append(f"# TYPE {name} gauge")
        if isinstance(value, dict):
            lines += [f'{name}{{kind="{_escape_label(str(k))}"}} {_fmt(v)}' for k, v in value.items()]
        else:
            lines.append(f"{name} {_fmt(value)}")
    return "\n".join(lines) + "\n"


async def serve_metrics(source: "Registry | Callable[[], str]", host: str, port: int) -> Any:
    """Serve `GET /metrics` for a service that has no HTTP server of its own, from a Registry or a
    function returning exposition text. Returns the AppRunner (`await runner.cleanup()` to stop)."""
    from aiohttp import web

    render = source.render if isinstance(source, Registry) else source

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=render().encode(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


@contextlib.asynccontextmanager
async def stats_endpoint(prefix: str, stats: Callable[[], dict[str, Any]], port: int | None) -> AsyncIterator[None]:
    """Serve a service's stats() as /metrics on `port` while the block runs (nothing when port is None)."""
    runner = None if port is None else await serve_metrics(lambda: stats_text(prefix, stats()), "0.0.0.0", port)
    try:
        yield
    finally:
        if runner:
            await runner.cleanup()


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")

"""shared/metrics.py: Prometheus text format 0.0.4, exact output."""

import pytest

from shared.metrics import CONTENT_TYPE, Registry


def test_counter_gauge_histogram_render_exactly() -> None:
    r = Registry()
    req = r.counter("x_requests_total", "requests by status", labels=("route", "status"))
    req.labels(route="/v1/chat", status="200").inc()
    req.labels("/v1/chat", "200").inc(2)
    req.labels(route="/v1/chat", status="400").inc()
    g = r.gauge("x_running", "in flight")
    g.inc(3)
    g.dec()
    h = r.histogram("x_latency_seconds", "latency", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 7):
        h.observe(v)
    assert r.render() == (
        "# HELP x_requests_total requests by status\n"
        "# TYPE x_requests_total counter\n"
        'x_requests_total{route="/v1/chat",status="200"} 3\n'
        'x_requests_total{route="/v1/chat",status="400"} 1\n'
        "# HELP x_running in flight\n"
        "# TYPE x_running gauge\n"
        "x_running 2\n"
        "# HELP x_latency_seconds latency\n"
        "# TYPE x_latency_seconds histogram\n"
        'x_latency_seconds_bucket{le="0.1"} 1\n'
        'x_latency_seconds_bucket{le="1"} 3\n'
        'x_latency_seconds_bucket{le="+Inf"} 4\n'
        "x_latency_seconds_sum 8.05\n"
        "x_latency_seconds_count 4\n"
    )


def test_unused_unlabelled_metrics_show_zero_and_labelled_show_nothing() -> None:
    r = Registry()
    r.counter("a_total", "a")
    r.counter("b_total", "b", labels=("x",))
    r.histogram("h", "h", buckets=(1,))
    text = r.render()
    assert "a_total 0\n" in text and "b_total{" not in text
    assert 'h_bucket{le="+Inf"} 0\nh_sum 0\nh_count 0\n' in text


def test_labelled_histogram_and_escaping() -> None:
    r = Registry()
    h = r.histogram("h", "help with \\ and\nnewline", labels=("path",), buckets=(1,))
    h.labels(path='a"b\\c\nd').observe(0.5)
    text = r.render()
    assert "# HELP h help with \\\\ and\\nnewline\n" in text
    assert 'h_bucket{path="a\\"b\\\\c\\nd",le="1"} 1\n' in text
    assert 'h_count{path="a\\"b\\\\c\\nd"} 1\n' in text


def test_gauge_set_and_set_function() -> None:
    r = Registry()
    g = r.gauge("g", "g")
    g.set(1.5)
    assert "g 1.5\n" in r.render()
    state = {"n": 7}
    g.set_function(lambda: state["n"])
    state["n"] = 9
    assert "g 9\n" in r.render()


def test_misuse_is_refused() -> None:
    r = Registry()
    c = r.counter("c_total", "c", labels=("a",))
    with pytest.raises(ValueError):
        c.inc()  # labelled metric needs .labels()
    with pytest.raises(ValueError):
        c.labels(b="1")
    with pytest.raises(ValueError):
        c.labels("1", "2")
    with pytest.raises(ValueError):
        r.counter("c_total", "again")
    with pytest.raises(ValueError):
        r.counter("d_total", "d").inc(-1)
    with pytest.raises(ValueError):
        r.histogram("h", "h", labels=("le",))
    with pytest.raises(ValueError):
        r.histogram("h2", "h", buckets=())


def test_content_type() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


async def test_serve_metrics_over_http() -> None:
    import aiohttp

    from shared.metrics import serve_metrics

    r = Registry()
    r.counter("up_total", "up").inc()
    runner = await serve_metrics(r, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200 and "up_total 1" in await resp.text()
    finally:
        await runner.cleanup()


def test_stats_text_renders_numbers_and_kinds():
    from shared.metrics import stats_text

    text = stats_text("xllm_router", {"routed": 3, "failures": {"overloaded": 2, "no_instances": 1}})
    assert "xllm_router_routed 3" in text
    assert 'xllm_router_failures{kind="overloaded"} 2' in text
    assert 'xllm_router_failures{kind="no_instances"} 1' in text
    assert "# TYPE xllm_router_failures gauge" in text

"""Prometheus exposition (router.metrics): metric types, text format, parser."""

from __future__ import annotations

import math
import threading

import pytest

from router.metrics import (CONTENT_TYPE, ITL_BUCKETS, TTFT_BUCKETS, Counter, Gauge, Histogram,
                            Registry, RouterMetrics, parse_prometheus_text)


def _key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_counter_and_gauge_round_trip():
    reg = Registry()
    c = reg.register(Counter("jobs_total", "Jobs done.", ("kind",)))
    g = reg.register(Gauge("depth", "Queue depth."))
    c.labels(kind="a").inc()
    c.labels(kind="a").inc(2.5)
    c.labels(kind="b")
    g.set(7)
    g.inc(3)
    g.dec()
    text = reg.render()
    assert text.endswith("\n")
    assert "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\n" in text
    assert "# TYPE depth gauge" in text
    parsed = parse_prometheus_text(text)
    assert parsed == {_key("jobs_total", kind="a"): 3.5, _key("jobs_total", kind="b"): 0.0,
                      _key("depth"): 9.0}
    assert c.labels(kind="a").value == 3.5 and g.value == 9.0


def test_counter_misuse():
    c = Counter("x_total", "x", ("a",))
    with pytest.raises(ValueError, match="can only increase"):
        c.labels(a="1").inc(-1)
    with pytest.raises(ValueError, match="use .labels"):
        c.inc()
    with pytest.raises(ValueError, match="takes labels"):
        c.labels(b="1")
    with pytest.raises(ValueError, match="must be a str"):
        c.labels(a=1)


def test_histogram_bucket_math():
    reg = Registry()
    h = reg.register(Histogram("lat_seconds", "Latency.", [0.1, 0.5, 1.0]))
    for v in (0.05, 0.1, 0.2, 0.5, 0.7, 3.0, math.inf):
        h.observe(v)
    cumulative, total, count = h._only_child().snapshot()
    assert cumulative == [(0.1, 2), (0.5, 4), (1.0, 5), (math.inf, 7)]   # le is inclusive
    assert count == 7 and total == math.inf
    h2 = reg.register(Histogram("ttft_seconds", "TTFT.", (0.5, 1.0, math.inf), ("route",)))
    h2.labels(route="remote").observe(0.75)
    h2.labels(route="remote").observe(0.25)
    parsed = parse_prometheus_text(reg.render())
    b = lambda le: parsed[_key("ttft_seconds_bucket", route="remote", le=le)]  # noqa: E731
    assert (b("0.5"), b("1.0"), b("+Inf")) == (1, 2, 2)
    assert parsed[_key("ttft_seconds_sum", route="remote")] == 1.0
    assert parsed[_key("ttft_seconds_count", route="remote")] == 2
    assert parsed[_key("lat_seconds_bucket", le="+Inf")] == 7
    assert parsed[_key("lat_seconds_sum")] == math.inf
    with pytest.raises(ValueError, match="NaN"):
        h.observe(float("nan"))


@pytest.mark.parametrize("buckets", [[], [1.0, 1.0], [2.0, 1.0], [0.1, float("nan")]])
def test_histogram_rejects_bad_buckets(buckets):
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram("h", "h", buckets)


def test_label_escaping_round_trips():
    reg = Registry()
    g = reg.register(Gauge("g", 'Help with \\ and\nnewline "quotes".', ("node",)))
    tricky = 'a\\b"c\nd,e}f= '
    g.labels(node=tricky).set(-2.5)
    text = reg.render()
    assert 'node="a\\\\b\\"c\\nd,e}f= "' in text
    assert '# HELP g Help with \\\\ and\\nnewline "quotes".' in text
    assert len(text.splitlines()) == 3
    assert parse_prometheus_text(text) == {_key("g", node=tricky): -2.5}


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", None])
def test_invalid_metric_names(name):
    with pytest.raises(ValueError, match="invalid metric name"):
        Counter(name, "help")


@pytest.mark.parametrize("label", ["", "1a", "a:b", "__reserved", "a-b"])
def test_invalid_label_names(label):
    with pytest.raises(ValueError, match="invalid label name"):
        Gauge("ok_name", "help", (label,))


def test_registry_rejects_clashes():
    reg = Registry()
    reg.register(Histogram("req", "r", [1.0]))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Counter("req_count", "c"))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Gauge("req", "g"))
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "h", [1.0], ("le",))
    assert Registry().render() == ""


def test_parser_details_and_errors():
    text = ('# HELP a x\n# TYPE a gauge\n# arbitrary comment\n\n'
            'a{x="1",y="q\\"z"} +Inf 1700000000\nb -Inf\nc NaN\nd 1e-3\n')
    parsed = parse_prometheus_text(text)
    assert parsed[_key("a", x="1", y='q"z')] == math.inf
    assert parsed[_key("b")] == -math.inf and math.isnan(parsed[_key("c")])
    assert parsed[_key("d")] == 0.001
    for bad in ["a{x=1} 2", 'a{x="1} 2', "a 1 2 3", "a", "1a 2", 'a{x="\\q"} 1', "a zz",
                "a 1\na 2", 'a{x="1",x="2"} 3']:
        with pytest.raises(ValueError, match="line"):
            parse_prometheus_text(bad)


def test_threads_do_not_lose_updates():
    c = Counter("t_total", "t", ("k",))
    h = Histogram("t_seconds", "t", [0.5])

    def work():
        for _ in range(2000):
            c.labels(k="x").inc()
            h.observe(0.25)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.labels(k="x").value == 8000
    assert h._only_child().snapshot()[2] == 8000


def test_router_metrics_names_and_round_trip():
    reg = Registry()
    m = RouterMetrics(reg)
    m.requests.labels(route="remote", status="ok").inc()
    m.route_decisions.labels(policy="ttft", route="local", reason="cached").inc()
    m.ttft.observe(0.012)
    m.itl.observe(0.004)
    m.e2e.observe(1.5)
    m.kv_transfer_bytes.inc(46_000)
    m.kv_transfer_seconds.inc(0.02)
    m.queue_depth.labels(node="d0", role="decode").set(3)
    m.kv_usage.labels(node="d0", role="decode").set(0.25)
    m.prompt_tokens.inc(12)
    m.generation_tokens.inc(4)
    m.http_errors.labels(status="400").inc()
    m.nodes.labels(role="decode", state="up").set(1)
    m.fallbacks.labels(reason="timeout").inc()
    parsed = parse_prometheus_text(reg.render())
    names = {name for name, _ in parsed}
    assert {"disagg_requests_total", "disagg_route_decisions_total",
            "disagg_time_to_first_token_seconds_bucket", "disagg_inter_token_latency_seconds_sum",
            "disagg_e2e_request_latency_seconds_count", "disagg_kv_transfer_bytes_total",
            "disagg_kv_transfer_seconds_total", "disagg_queue_depth", "disagg_kv_usage_ratio",
            "disagg_prompt_tokens_total", "disagg_generation_tokens_total",
            "disagg_http_errors_total", "disagg_nodes", "disagg_fallbacks_total"} <= names
    assert parsed[_key("disagg_requests_total", route="remote", status="ok")] == 1
    assert parsed[_key("disagg_requests_total", route="fallback", status="aborted")] == 0
    assert parsed[_key("disagg_nodes", role="prefill", state="down")] == 0
    assert parsed[_key("disagg_time_to_first_token_seconds_bucket", le="0.01")] == 0
    assert parsed[_key("disagg_time_to_first_token_seconds_bucket", le="0.025")] == 1
    assert TTFT_BUCKETS[0] == 0.01 and TTFT_BUCKETS[-1] == 60.0
    assert ITL_BUCKETS[0] == 0.001 and ITL_BUCKETS[-1] == 10.0
    assert "version=0.0.4" in CONTENT_TYPE
    with pytest.raises(ValueError, match="already registered"):
        RouterMetrics(reg)

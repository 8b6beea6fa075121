"""router.metrics on prometheus_client: names, label series, buckets, exposition read back."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import (
    E2E_BUCKETS, ITL_BUCKETS, NODE_COUNTERS, NODE_STATES, OVERHEAD_BUCKETS, REQUEST_STATUSES,
    ROLES, ROUTES, TTFT_BUCKETS, Deferred, RouterMetrics)

FAMILIES = {   # exposed family name -> (type, label names)
    "disagg_requests": ("counter", ("route", "status")),
    "disagg_route_decisions": ("counter", ("policy", "route", "reason")),
    "disagg_time_to_first_token_seconds": ("histogram", ()),
    "disagg_inter_token_latency_seconds": ("histogram", ()),
    "disagg_e2e_request_latency_seconds": ("histogram", ()),
    "disagg_kv_transfer_bytes": ("counter", ()),
    "disagg_kv_transfer_seconds": ("counter", ()),
    "disagg_queue_depth": ("gauge", ("node", "role")),
    "disagg_kv_usage_ratio": ("gauge", ("node", "role")),
    "disagg_prompt_tokens": ("counter", ()),
    "disagg_generation_tokens": ("counter", ()),
    "disagg_http_errors": ("counter", ("status",)),
    "disagg_nodes": ("gauge", ("role", "state")),
    "disagg_node_restarts": ("counter", ("role",)),
    "disagg_node_requests": ("gauge", ("node", "role")),
    "disagg_node_kv_blocks_used": ("gauge", ("node", "role")),
    "disagg_node_pinned_requests": ("gauge", ("node", "role")),
    "disagg_node_kv_sends": ("gauge", ("node", "role")),
    "disagg_node_tp": ("gauge", ("node", "role")),
    "disagg_node_compute_units": ("gauge", ("node", "role")),
    "disagg_node_kv_capacity_tokens": ("gauge", ("node", "role")),
    "disagg_node_kv_bytes_per_token": ("gauge", ("node", "role")),
    "disagg_fallbacks": ("counter", ("reason",)),
    "disagg_rejected": ("counter", ("reason",)),
    "disagg_migrations": ("counter", ("reason",)),
    "disagg_migration_failures": ("counter", ("reason",)),
    "disagg_parked_requests": ("gauge", ()),
    "disagg_router_overhead_seconds": ("histogram", ("direction",)),
    "disagg_decode_prefix_cached_tokens": ("counter", ()),
    "disagg_cost_model_estimate": ("gauge", ("name", "role", "node")),
    "disagg_cost_model_observations": ("gauge", ("name", "role", "node")),
}


def _scrape(registry: CollectorRegistry) -> tuple[dict, dict]:
    """``({family name: Metric}, {(sample name, frozenset(labels)): value})``."""
    families = {f.name: f for f in
                text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in families.values() for s in f.samples}
    return families, samples


def _key(metric: str, **labels: str) -> tuple[str, frozenset]:
    return metric, frozenset(labels.items())


def _le(bound: float) -> str:
    """An ``le`` label as prometheus_client writes it (Go float formatting)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


def test_every_family_name_type_and_labels(reg):
    RouterMetrics(reg)
    text = generate_latest(reg).decode()
    families, samples = _scrape(reg)
    assert {n: f.type for n, f in families.items()} == {n: t for n, (t, _) in FAMILIES.items()}
    for name, (kind, labelnames) in FAMILIES.items():
        assert families[name].documentation, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == set(labelnames), (name, s)
        if kind == "counter":    # exposed names keep today's ``_total`` spelling
            assert f"# TYPE {name}_total counter" in text
    assert not any(name.endswith("_created") for name, _ in samples)


def test_node_counters_name_counter_families():
    # router workers show these from one worker instead of summing them: a renamed
    # family would silently be summed again
    assert all(FAMILIES[name][0] == "counter" for name in NODE_COUNTERS)


def test_pre_created_series_are_zero(reg):
    RouterMetrics(reg)
    _, samples = _scrape(reg)
    for route in ROUTES:
        for status in REQUEST_STATUSES:
            assert samples[_key("disagg_requests_total", route=route, status=status)] == 0
    for role in ROLES:
        for state in NODE_STATES:
            assert samples[_key("disagg_nodes", role=role, state=state)] == 0
    assert samples[_key("disagg_kv_transfer_bytes_total")] == 0
    assert samples[_key("disagg_time_to_first_token_seconds_count")] == 0
    assert not any(n == "disagg_queue_depth" for n, _ in samples)   # no node yet, no series


def test_updates_round_trip(reg):
    m = RouterMetrics(reg)
    m.requests.labels(route="remote", status="ok").inc()
    m.requests.labels(route="remote", status="ok").inc(2)
    m.route_decisions.labels(policy="ttft", route="local", reason="cached").inc()
    m.kv_transfer_bytes.inc(46_000)
    m.kv_transfer_seconds.inc(0.02)
    m.queue_depth.labels(node="d0", role="decode").set(3)
    m.kv_usage.labels(node="d0", role="decode").set(0.25)
    m.prompt_tokens.inc(12)
    m.generation_tokens.inc(4)
    m.http_errors.labels(status="400").inc()
    m.nodes.labels(role="decode", state="up").set(1)
    m.fallbacks.labels(reason="timeout").inc()
    m.prefix_cached_tokens.inc(64)
    m.calibration.labels(name="link_bytes_per_s", role="", node="").set(1e9)
    _, s = _scrape(reg)
    assert s[_key("disagg_requests_total", route="remote", status="ok")] == 3
    assert s[_key("disagg_requests_total", route="fallback", status="aborted")] == 0
    assert s[_key("disagg_route_decisions_total", policy="ttft", route="local",
                  reason="cached")] == 1
    assert s[_key("disagg_kv_transfer_bytes_total")] == 46_000
    assert s[_key("disagg_kv_transfer_seconds_total")] == pytest.approx(0.02)
    assert s[_key("disagg_queue_depth", node="d0", role="decode")] == 3
    assert s[_key("disagg_kv_usage_ratio", node="d0", role="decode")] == 0.25
    assert s[_key("disagg_prompt_tokens_total")] == 12
    assert s[_key("disagg_generation_tokens_total")] == 4
    assert s[_key("disagg_http_errors_total", status="400")] == 1
    assert s[_key("disagg_nodes", role="decode", state="up")] == 1
    assert s[_key("disagg_fallbacks_total", reason="timeout")] == 1
    assert s[_key("disagg_decode_prefix_cached_tokens_total")] == 64
    assert s[_key("disagg_cost_model_estimate", name="link_bytes_per_s", role="",
                  node="")] == 1e9


@pytest.mark.parametrize("attr,family,buckets", [
    ("ttft", "disagg_time_to_first_token_seconds", TTFT_BUCKETS),
    ("itl", "disagg_inter_token_latency_seconds", ITL_BUCKETS),
    ("e2e", "disagg_e2e_request_latency_seconds", E2E_BUCKETS),
])
def test_histogram_buckets(reg, attr, family, buckets):
    m = RouterMetrics(reg)
    h = getattr(m, attr)
    values = (buckets[0], buckets[1] * 0.999, buckets[-1] * 2)   # le is inclusive
    for v in values:
        h.observe(v)
    _, s = _scrape(reg)
    les = [dict(k[1])["le"] for k in s if k[0] == family + "_bucket"]
    assert les == [_le(b) for b in (*buckets, float("inf"))]
    assert s[_key(family + "_bucket", le=_le(buckets[0]))] == 1
    assert s[_key(family + "_bucket", le=_le(buckets[1]))] == 2
    assert s[_key(family + "_bucket", le=_le(buckets[-1]))] == 2
    assert s[_key(family + "_bucket", le="+Inf")] == 3
    assert s[_key(family + "_count")] == 3
    assert s[_key(family + "_sum")] == pytest.approx(sum(values))


def test_labelled_histogram(reg):
    m = RouterMetrics(reg)
    m.router_overhead.labels(direction="ingress").observe(0.0002)
    m.router_overhead.labels(direction="egress").observe(0.002)
    m.router_overhead.labels(direction="egress").observe(2.0)
    _, s = _scrape(reg)
    name = "disagg_router_overhead_seconds"
    les = [dict(k[1])["le"] for k in s if k[0] == name + "_bucket"
           and dict(k[1])["direction"] == "egress"]
    assert les == [_le(b) for b in (*OVERHEAD_BUCKETS, float("inf"))]
    assert s[_key(name + "_bucket", direction="ingress", le="0.00025")] == 1
    assert s[_key(name + "_bucket", direction="egress", le="0.0015")] == 0
    assert s[_key(name + "_bucket", direction="egress", le="0.002")] == 1
    assert s[_key(name + "_bucket", direction="egress", le="1.0")] == 1
    assert s[_key(name + "_bucket", direction="egress", le="+Inf")] == 2
    assert s[_key(name + "_count", direction="egress")] == 2
    assert s[_key(name + "_sum", direction="egress")] == pytest.approx(2.002)


def test_label_values_with_special_characters_round_trip(reg):
    m = RouterMetrics(reg)
    tricky = 'a\\b"c\nd,e}f= '
    m.queue_depth.labels(node=tricky, role="decode").set(-2.5)
    _, s = _scrape(reg)
    assert s[_key("disagg_queue_depth", node=tricky, role="decode")] == -2.5


def test_misuse_raises(reg):
    m = RouterMetrics(reg)
    with pytest.raises(ValueError):
        m.kv_transfer_bytes.inc(-1)                       # counters only go up
    with pytest.raises(ValueError):
        m.requests.labels(route="local")                  # missing a label
    with pytest.raises(ValueError):
        m.requests.inc()                                  # labelled family used bare
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RouterMetrics(reg)                                # same names twice in one registry


def test_registries_are_isolated():
    a, b = CollectorRegistry(), CollectorRegistry()
    ma, _ = RouterMetrics(a), RouterMetrics(b)
    ma.generation_tokens.inc(5)
    assert _scrape(a)[1][_key("disagg_generation_tokens_total")] == 5
    assert _scrape(b)[1][_key("disagg_generation_tokens_total")] == 0


def test_threads_do_not_lose_updates(reg):
    m = RouterMetrics(reg)

    def work():
        for _ in range(2000):
            m.fallbacks.labels(reason="x").inc()
            m.itl.observe(0.004)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, s = _scrape(reg)
    assert s[_key("disagg_fallbacks_total", reason="x")] == 8000
    assert s[_key("disagg_inter_token_latency_seconds_count")] == 8000


def test_deferred_updates_wait_for_the_running_callback(reg):
    """On a loop, a ``Deferred`` holds its updates until the callback that made them has
    returned, then applies them all; the token path's wrappers feed the real series."""
    m = RouterMetrics(reg)
    itl = _key("disagg_inter_token_latency_seconds_count")
    tokens = _key("disagg_generation_tokens_total")
    egress = _key("disagg_router_overhead_seconds_count", direction="egress")
    seen = {}

    async def main():
        for _ in range(3):
            m.itl_soon.observe(0.004)
            m.generation_tokens_soon.inc(2)
            m.egress_soon.observe(0.001)
        seen["during"] = {k: _scrape(reg)[1][k] for k in (itl, tokens, egress)}
        await asyncio.sleep(0)
        seen["after"] = {k: _scrape(reg)[1][k] for k in (itl, tokens, egress)}

    asyncio.run(main())
    assert seen["during"] == {itl: 0, tokens: 0, egress: 0}
    assert seen["after"] == {itl: 3, tokens: 6, egress: 3}


def test_deferred_updates_survive_a_loop_that_ends_first(reg):
    """Updates whose apply was due on a loop that closed before running it are applied
    with the next loop's."""
    m = RouterMetrics(reg)
    loop = asyncio.new_event_loop()

    async def observe():
        m.itl_soon.observe(0.004)
        loop.stop()                              # stops before its next turn runs the apply

    task = loop.create_task(observe())
    loop.run_forever()
    assert task.done()
    loop.close()
    count = _key("disagg_inter_token_latency_seconds_count")
    assert _scrape(reg)[1][count] == 0

    async def observe_and_yield():
        m.itl_soon.observe(0.005)
        await asyncio.sleep(0)

    asyncio.run(observe_and_yield())
    assert _scrape(reg)[1][count] == 2


def test_deferred_applies_at_once_without_a_loop(reg):
    m = RouterMetrics(reg)
    Deferred(m.ttft).observe(0.3)
    Deferred(m.prompt_tokens).inc(7)
    _, s = _scrape(reg)
    assert s[_key("disagg_time_to_first_token_seconds_count")] == 1
    assert s[_key("disagg_prompt_tokens_total")] == 7

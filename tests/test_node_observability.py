"""A node's own /metrics, /readyz and /livez (disagg/node/observability.py): a real
NodeHTTPServer on a free port read over HTTP, the exposition parsed back, the
liveness watch on a given clock, and the preemption counter fed by a real engine."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import random_prompts
from disagg.node.observability import LOAD_GAUGES, LoopWatch, NodeHTTPServer, NodeMetrics

IDLE_LOAD = {"queued_prefill_tokens": 0, "num_running": 0, "num_waiting": 0,
             "num_waiting_for_kv": 0, "num_pinned": 0, "kv_usage": 0.0, "num_requests": 0,
             "num_used_blocks": 0, "num_kv_sends": 0, "num_preemptions": 0}


def scrape(url: str) -> dict:
    """``{(sample name, frozenset(labels)): value}`` of ``url``/metrics."""
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def val(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def always_ok() -> tuple[bool, str]:
    return True, ""


@pytest.fixture
def node():
    """A decode node's metrics served on a free port: ``(metrics, url)``."""
    metrics = NodeMetrics("decode", "decode-7", num_kv_blocks=100)
    with NodeHTTPServer("127.0.0.1", 0, metrics.registry, always_ok, always_ok) as http:
        yield metrics, f"http://127.0.0.1:{http.port}"


def test_metrics_follow_steps_and_load(node):
    metrics, url = node
    got = scrape(url)
    assert val(got, "disagg_engine_info", role="decode", node_id="decode-7") == 1
    assert val(got, "disagg_engine_kv_capacity_blocks") == 100
    assert val(got, "disagg_engine_steps_total") == 0
    assert val(got, "disagg_engine_kv_transfer_bytes_total", direction="sent") == 0
    assert not any(name.endswith("_created") for name, _ in got)

    metrics.observe_step(0.020, 48, 0)          # a prefill chunk
    metrics.observe_step(0.004, 0, 3)           # a decode step of 3
    metrics.observe_step(0.8, 16, 5)            # mixed
    metrics.update({**IDLE_LOAD, "queued_prefill_tokens": 70, "num_running": 5,
                    "num_waiting": 4, "num_requests": 11, "num_waiting_for_kv": 2,
                    "num_used_blocks": 40, "kv_usage": 0.4, "num_kv_sends": 1, "num_pinned": 0},
                   {"bytes_sent": 0, "bytes_received": 4096}, turn_wait_s=0.25, turns_skipped=2)
    got = scrape(url)
    assert val(got, "disagg_engine_compute_turn_wait_seconds_total") == 0.25
    assert val(got, "disagg_engine_compute_turns_skipped_total") == 2
    assert val(got, "disagg_engine_steps_total") == 3
    assert val(got, "disagg_engine_prefill_tokens_total") == 64
    assert val(got, "disagg_engine_decode_tokens_total") == 8
    assert val(got, "disagg_engine_step_seconds_count") == 3
    assert val(got, "disagg_engine_step_seconds_sum") == pytest.approx(0.824)
    assert val(got, "disagg_engine_step_seconds_bucket", le="0.005") == 1
    assert val(got, "disagg_engine_step_seconds_bucket", le="0.025") == 2
    assert val(got, "disagg_engine_step_seconds_bucket", le="0.75") == 2
    assert val(got, "disagg_engine_step_seconds_bucket", le="1.0") == 3
    assert val(got, "disagg_engine_step_prefill_tokens_bucket", le="0.0") == 1   # decode-only
    assert val(got, "disagg_engine_step_prefill_tokens_sum") == 64
    assert val(got, "disagg_engine_step_decode_requests_bucket", le="0.0") == 1  # prefill-only
    assert val(got, "disagg_engine_step_decode_requests_bucket", le="4.0") == 2
    assert val(got, "disagg_engine_step_decode_requests_sum") == 8
    assert val(got, "disagg_engine_waiting_requests") == 4
    assert val(got, "disagg_engine_running_requests") == 5
    assert val(got, "disagg_engine_requests") == 11
    assert val(got, "disagg_engine_waiting_for_kv_requests") == 2
    assert val(got, "disagg_engine_queued_prefill_tokens") == 70
    assert val(got, "disagg_engine_kv_used_blocks") == 40
    assert val(got, "disagg_engine_kv_usage_ratio") == 0.4
    assert val(got, "disagg_engine_kv_sends_in_flight") == 1
    assert val(got, "disagg_engine_pinned_requests") == 0
    assert val(got, "disagg_engine_kv_transfer_bytes_total", direction="received") == 4096

    metrics.update(IDLE_LOAD, {"bytes_sent": 0, "bytes_received": 4096}, turn_wait_s=0.75,
                   turns_skipped=5)
    got = scrape(url)
    assert val(got, "disagg_engine_running_requests") == 0           # gauges follow
    assert val(got, "disagg_engine_compute_turn_wait_seconds_total") == 0.75
    assert val(got, "disagg_engine_compute_turns_skipped_total") == 5
    assert val(got, "disagg_engine_kv_transfer_bytes_total", direction="received") == 4096


def test_running_totals_become_counters_that_never_go_backwards(node):
    metrics, url = node
    seen = []
    # kv_stats and load()["num_preemptions"] are running totals; the last step is a
    # restart of whatever counted them (total back near 0): a reset, not a decrease
    for sent, preempted in ((1000, 0), (1000, 2), (5000, 3), (5000, 3), (700, 1)):
        metrics.update({**IDLE_LOAD, "num_preemptions": preempted},
                       {"bytes_sent": sent, "bytes_received": 0})
        got = scrape(url)
        seen.append((val(got, "disagg_engine_kv_transfer_bytes_total", direction="sent"),
                     val(got, "disagg_engine_preemptions_total")))
    assert seen == [(1000, 0), (1000, 2), (5000, 3), (5000, 3), (5700, 4)]
    assert val(got, "disagg_engine_kv_transfer_bytes_total", direction="received") == 0


def test_update_needs_every_load_key(node):
    metrics, _ = node
    for key in [k for k, _, _ in LOAD_GAUGES] + ["num_preemptions"]:
        with pytest.raises(KeyError):
            metrics.update({k: v for k, v in IDLE_LOAD.items() if k != key},
                           {"bytes_sent": 0, "bytes_received": 0})


def test_names_do_not_collide_with_the_router():
    """One Prometheus may scrape the router and every node: no family in both."""
    from router.metrics import RouterMetrics
    router = CollectorRegistry()
    RouterMetrics(router)
    node = NodeMetrics("prefill", "p0", num_kv_blocks=8).registry
    names = {reg: {s.name for fam in reg.collect() for s in fam.samples}
             for reg in (router, node)}
    assert names[node] and names[router]
    assert not names[node] & names[router]
    assert all(n.startswith("disagg_engine_") for n in names[node])


@pytest.mark.parametrize("args, kw", [
    (("colocated", "n0"), {"num_kv_blocks": 8}),
    (("decode", ""), {"num_kv_blocks": 8}),
    (("decode", "d0"), {"num_kv_blocks": 0}),
])
def test_node_metrics_rejects_bad_arguments(args, kw):
    with pytest.raises(ValueError):
        NodeMetrics(*args, **kw)


def test_observe_step_rejects_negative_figures():
    metrics = NodeMetrics("decode", "d0", num_kv_blocks=8)
    for bad in ((-0.1, 0, 0), (0.1, -1, 0), (0.1, 0, -1)):
        with pytest.raises(ValueError):
            metrics.observe_step(*bad)


def test_probes_follow_their_callbacks_and_survive_errors():
    state = {"ready": (False, "model loading"), "live": (True, "")}

    def ready():
        if state["ready"] == "raise":
            raise RuntimeError("router connection gone")
        return state["ready"]

    with NodeHTTPServer("127.0.0.1", 0, CollectorRegistry(), ready,
                        lambda: state["live"]) as http:
        url = f"http://127.0.0.1:{http.port}"
        r = httpx.get(f"{url}/readyz")
        assert (r.status_code, r.json()) == (503, {"status": "not ready",
                                                   "reason": "model loading"})
        assert r.headers["content-type"] == "application/json"
        assert (httpx.get(f"{url}/livez").status_code, httpx.get(f"{url}/livez").json()) == \
            (200, {"status": "live"})
        state["ready"] = (True, "")
        r = httpx.get(f"{url}/readyz")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        state["live"] = (False, "stuck")
        r = httpx.get(f"{url}/livez")
        assert (r.status_code, r.json()) == (503, {"status": "not live", "reason": "stuck"})

        state["ready"] = "raise"
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        assert "RuntimeError: router connection gone" in r.json()["reason"]
        state["live"] = "not a pair"                 # a malformed answer fails the check too
        assert httpx.get(f"{url}/livez").status_code == 503
        state["ready"], state["live"] = (True, ""), (True, "")
        assert httpx.get(f"{url}/readyz").status_code == 200        # still serving
        assert httpx.get(f"{url}/livez").status_code == 200


def test_other_paths_and_methods(node):
    _, url = node
    for path in ("/", "/health", "/readyz/x", "/metricsx"):
        assert httpx.get(f"{url}{path}").status_code == 404, path
    assert httpx.post(f"{url}/readyz").status_code == 405
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_livez_with_a_loop_watch():
    clock = {"now": 1000.0}
    watch = LoopWatch(stall_s=60.0)
    watch.tick(now=1000.0)
    with NodeHTTPServer("127.0.0.1", 0, CollectorRegistry(), always_ok,
                        lambda: watch.live(now=clock["now"])) as http:
        url = f"http://127.0.0.1:{http.port}/livez"
        assert httpx.get(url).status_code == 200
        clock["now"] = 1061.0
        r = httpx.get(url)
        assert r.status_code == 503 and "no progress for 61.0 s" in r.json()["reason"]
        watch.tick(now=1061.0)
        assert httpx.get(url).status_code == 200


def test_loop_watch_detects_a_stall():
    watch = LoopWatch(stall_s=5.0)
    watch.tick(now=100.0)
    assert watch.live(now=100.0) == (True, "")
    assert watch.live(now=105.0) == (True, "")            # exactly the limit: still live
    ok, why = watch.live(now=105.5)
    assert not ok and "5.5 s" in why
    watch.tick(now=200.0)
    assert watch.live(now=201.0)[0]
    assert LoopWatch(stall_s=60.0).live()[0]              # made now: counts as ticked
    watch.tick()                                          # the real monotonic clock
    assert watch.live()[0]


@pytest.mark.parametrize("stall_s", [0, -1.0, float("nan"), float("inf")])
def test_loop_watch_rejects_bad_stall(stall_s):
    with pytest.raises(ValueError):
        LoopWatch(stall_s=stall_s)


def test_close_frees_the_port_and_is_idempotent():
    http = NodeHTTPServer("127.0.0.1", 0, CollectorRegistry(), always_ok, always_ok).start()
    port = http.port
    assert port > 0 and httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200
    http.close()
    assert not http._thread.is_alive()
    http.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/livez")
    # the port is free again: a new server binds it (as a restarted node would)
    with NodeHTTPServer("127.0.0.1", port, CollectorRegistry(), always_ok, always_ok) as again:
        assert httpx.get(f"http://127.0.0.1:{again.port}/livez").status_code == 200
    with pytest.raises(RuntimeError):
        http.start()
    NodeHTTPServer("127.0.0.1", 0, CollectorRegistry(), always_ok, always_ok).close()  # unstarted
    with pytest.raises(ValueError):
        NodeHTTPServer("127.0.0.1", 70000, CollectorRegistry(), always_ok, always_ok)


def test_engine_preemptions_reach_the_counter(tiny_llama):
    """A real engine with a small KV cache preempts; its load() feeds every gauge
    and the preemption counter, which ends at the scheduler's total."""
    from disagg.config import EngineConfig
    from disagg.engine import LLMEngine
    from disagg.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # 16 blocks of 4 tokens cannot hold 4 requests of up to 36 tokens at once
    with LLMEngine(EngineConfig(model=tiny_llama, num_kv_blocks=16, block_size=4)) as engine:
        metrics = NodeMetrics("decode", "d0", num_kv_blocks=engine.num_blocks)
        prompts = random_prompts(4, 256, 16, 24, seed=9)
        for prompt in prompts:
            engine.add_request(prompt, params)
        peak_running = 0
        while engine.has_unfinished():
            engine.step()
            metrics.observe_step(0.0, *engine.last_step_tokens)
            metrics.update(engine.load(), engine.kv_stats)
            peak_running = max(peak_running, metrics.registry.get_sample_value(
                "disagg_engine_running_requests"))
        assert engine.scheduler.num_preemptions > 0
        assert engine.is_idle()
    get = metrics.registry.get_sample_value
    assert get("disagg_engine_preemptions_total") == engine.scheduler.num_preemptions
    assert get("disagg_engine_prefill_tokens_total") >= sum(map(len, prompts))
    assert get("disagg_engine_decode_tokens_total") > 0
    assert get("disagg_engine_requests") == 0 and get("disagg_engine_kv_used_blocks") == 0
    assert peak_running >= 2

"""Router workers: router processes sharing one HTTP port (``--reuse-port``), each also
reachable alone (``--own-port``) — real processes; the last test adds a decode node."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import needs_smollm2
from prometheus_client.multiprocess import MultiProcessCollector
from router_helpers import router_ready, start_router
from serving_helpers import metric, metrics
from disagg.cluster import ClusterConfig, LocalCluster
from router.metrics import MULTIPROC_DIR_ENV


def _router_id(url: str) -> str:
    # a new connection each time (no client reuse), so the kernel picks a worker anew
    return httpx.get(url + "/health", timeout=10).json()["router_id"]


def test_two_workers_share_the_port_and_each_is_reachable_alone(tmp_path):
    procs = []
    try:
        first, ready = start_router(tmp_path, "a", 0, "--reuse-port", "--own-port", "0")
        procs.append(first)
        a = router_ready(first, ready, tmp_path / "a.log")
        port = int(a["http"].rsplit(":", 1)[1])
        second, ready = start_router(tmp_path, "b", port, "--reuse-port", "--own-port", "0")
        procs.append(second)
        b = router_ready(second, ready, tmp_path / "b.log")
        assert a["http"] == b["http"] and len({a["own_http"], b["own_http"], a["http"]}) == 3
        assert a["control"] != b["control"]
        ids = {_router_id(a["own_http"]), _router_id(b["own_http"])}
        assert len(ids) == 2                               # each own port is one worker
        seen = {_router_id(a["http"]) for _ in range(40)}
        assert seen == ids                                 # the shared port reaches both
        first.terminate()
        first.wait(timeout=30)
        # the kernel stops handing connections to a closed listener: the other serves all
        assert {_router_id(a["http"]) for _ in range(10)} == {_router_id(b["own_http"])}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _errors_404(counter_file: Path) -> float:
    """One worker's own count of 404 answers, read from its multiprocess file."""
    return sum(s.value for family in MultiProcessCollector.merge([str(counter_file)])
               for s in family.samples
               if s.name == "disagg_http_errors_total" and s.labels == {"status": "404"})


def test_workers_sharing_a_metrics_directory_each_serve_the_sum(tmp_path):
    shared_dir = tmp_path / "metrics"
    shared_dir.mkdir()
    procs = []
    try:
        first, ready = start_router(tmp_path, "a", 0, "--reuse-port", "--own-port", "0",
                                    metrics_dir=shared_dir)
        procs.append(first)
        a = router_ready(first, ready, tmp_path / "a.log")
        port = int(a["http"].rsplit(":", 1)[1])
        second, ready = start_router(tmp_path, "b", port, "--reuse-port", "--own-port", "0",
                                     metrics_dir=shared_dir)
        procs.append(second)
        b = router_ready(second, ready, tmp_path / "b.log")
        # an unknown model: every completion is a counted 404, whichever worker takes it
        for _ in range(24):
            r = httpx.post(a["http"] + "/v1/completions", timeout=30,
                           json={"model": "x", "prompt": "Hi", "max_tokens": 1})
            assert r.status_code == 404, r.text
        own = sorted(shared_dir.glob("counter_*.db"))
        assert [f.name for f in own] == sorted(f"counter_{p.pid}.db" for p in procs)
        assert all(_errors_404(f) >= 1 for f in own)        # both workers took some
        for url in (a["http"], a["own_http"], b["own_http"]):
            got = metrics(url)
            assert got[("disagg_http_errors_total", frozenset({("status", "404")}))] == 24
            assert got[("disagg_time_to_first_token_seconds_count", frozenset())] == 0
            # gauges come from the answering worker: one series each, not one per worker
            assert got[("disagg_nodes", frozenset({("role", "decode"), ("state", "up")}))] == 0
            text = httpx.get(url + "/metrics", timeout=10).text
            assert text.count('disagg_nodes{role="decode",state="up"}') == 1
            assert "pid=" not in text
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_metrics_directory_that_is_not_one_is_refused(tmp_path):
    router, _ = start_router(tmp_path, "a", 0, metrics_dir=tmp_path / "missing")
    assert router.wait(timeout=60) == 2
    log = (tmp_path / "a.log").read_text()
    assert f"{MULTIPROC_DIR_ENV}='{tmp_path / 'missing'}' is not a directory" in log, log


def test_a_taken_port_is_refused_without_reuse_port(tmp_path):
    first, ready = start_router(tmp_path, "a", 0, "--reuse-port")
    try:
        a = router_ready(first, ready, tmp_path / "a.log")
        assert a["own_http"] == a["http"]                  # no --own-port: one listener
        port = int(a["http"].rsplit(":", 1)[1])
        other, _ = start_router(tmp_path, "b", port)       # not a worker: must not share it
        assert other.wait(timeout=60) != 0
        assert "address already in use" in (tmp_path / "b.log").read_text().lower()
    finally:
        first.kill()
        first.wait()


def test_cluster_config_checks_router_workers():
    assert ClusterConfig().router_workers == 1
    with pytest.raises(ValueError, match="router_workers"):
        ClusterConfig(router_workers=0)
    assert LocalCluster.router_name(0) == "router" and LocalCluster.router_name(2) == "router-2"


@needs_smollm2
def test_one_worker_restarts_on_its_control_address_and_the_node_rejoins_it(tmp_path,
                                                                           monkeypatch):
    # the cluster gives its workers a directory of its own, its node none, whatever is set
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(tmp_path / "not-a-directory"))
    config = ClusterConfig(num_prefill=0, num_decode=1, policy="local", router_workers=2,
                           log_dir=str(tmp_path), node_args=("--kv-cache-memory", "64MiB"))
    with LocalCluster(config) as c:
        c.start()
        control, shared = c.router_controls[1], c.http_url
        old_id = c.health(c.router_urls[1])["router_id"]
        model = httpx.get(c.router_urls[1] + "/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0.0,
                "ignore_eos": True}
        assert httpx.post(c.router_urls[1] + "/v1/completions", timeout=120,
                          json=body).status_code == 200
        with pytest.raises(RuntimeError, match="router-1 is still running"):
            c.restart_router(1)
        with pytest.raises(ValueError, match="no router worker 2"):
            c.restart_router(2)
        c.kill("router-1")
        c.restart_router(1)                    # returns once the node registered again
        assert (c.router_controls[1], c.http_url) == (control, shared)
        health = c.health(c.router_urls[1])
        assert health["router_id"] != old_id and health["decode_nodes"] == 1
        assert c.health()["decode_nodes"] == 1                 # the other worker kept it
        r = httpx.post(c.router_urls[1] + "/v1/completions", timeout=120, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        # the workers share their counts: the killed process's request still counts
        for url in (c.router_urls[0], c.router_urls[1]):
            assert metric(url, "disagg_requests_total", route="local", status="ok") == 2
            assert metric(url, "disagg_generation_tokens_total") == 8

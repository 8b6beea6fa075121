"""Several routers, and nodes a cluster can watch — real processes on SmolLM2.

Two router processes (``remote`` and ``local`` policy) and two nodes (prefill TP 1,
decode TP 3) given both routers' control addresses (``--router A,B``). The nodes start
first, so their ``/readyz`` says 503 until a router answers; then requests go through
both routers (the same greedy text whichever router and route), each router counts only
its own, the nodes' ``/metrics`` (parsed by prometheus_client) show the steps and KV
bytes; a decode TP rank stopped mid-request makes ``/livez`` 503 while the node keeps
heartbeating; a router stopped past its node timeout drops nobody when it resumes; one
router SIGKILLed, the other serves on and nothing is left held.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import needs_smollm2, random_prompts
from serving_helpers import MODEL, metrics, post, wait_metric

STALL_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out,
                                stderr=subprocess.STDOUT)


def _wait(what, timeout_s: float, procs=(), every_s: float = 0.1):
    """Poll ``what()`` until it is truthy (and return it); fail if a process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = what()
        if got:
            return got
        for p in procs:
            assert p.poll() is None, f"{p.args[2]} exited with {p.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def _get(url: str, timeout: float = 5.0) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None


def _node_metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _complete(url: str, prompt: list[int]) -> str:
    r = post(url, model=MODEL, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("replicas")
    controls = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(2)]
    http = {role: _free_port() for role in ("prefill", "decode")}
    common = ["--router", ",".join(controls), "--kv-cache-memory", "64MiB",
              "--kv-transport", "zmq", "--heartbeat-s", "0.25",
              "--live-stall-s", str(STALL_S)]
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["prefill"] = _spawn(["prefill_node", *common, "--node-id", "prefill-0",
                                   "--http-port", str(http["prefill"])], tmp / "prefill.log")
        procs["decode"] = _spawn(["decode_node", *common, "--node-id", "decode-0", "--tp", "3",
                                  "--http-port", str(http["decode"])], tmp / "decode.log")
        nodes = {role: f"http://127.0.0.1:{port}" for role, port in http.items()}
        # loaded, no router yet: alive but not ready
        for url in nodes.values():
            r = _wait(lambda: _get(url + "/readyz"), 180, procs.values(), every_s=0.25)
            assert r.status_code == 503 and "not registered" in r.json()["reason"], r.text
            assert _get(url + "/livez").status_code == 200
        urls = []
        for name, control, policy in (("a", controls[0], "remote"),
                                      ("b", controls[1], "local")):
            ready = tmp / f"router-{name}.json"
            procs[f"router-{name}"] = _spawn(
                ["router", "--port", "0", "--control-address", control, "--model", "default",
                 "--policy", policy, "--node-timeout-s", "5", "--ready-file", str(ready)],
                tmp / f"router-{name}.log")
            _wait(ready.exists, 60, procs.values())
            urls.append(json.loads(ready.read_text())["http"])
        for url in urls:
            _wait(lambda: set(httpx.get(url + "/health", timeout=5).json().get("nodes", {}))
                  == {"prefill-0", "decode-0"}, 60, procs.values())
        yield {"routers": urls, "nodes": nodes, "procs": procs, "tmp": tmp}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
        for p in procs.values():
            p.wait(30)


@needs_smollm2
@pytest.mark.slow
def test_two_routers_share_the_nodes_and_each_counts_its_own(deployment):
    a, b = deployment["routers"]
    nodes = deployment["nodes"]
    for url in nodes.values():
        assert _get(url + "/readyz").status_code == 200      # registered now
    prompts = random_prompts(3, 49152, 150, 200, seed=21)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        via = {(r, i): pool.submit(_complete, r, p) for r in (a, b) for i, p in enumerate(prompts)}
        texts = {k: f.result() for k, f in via.items()}
    for i in range(len(prompts)):
        assert texts[(a, i)] == texts[(b, i)]                 # remote (via a) == local (via b)
    got_a, got_b = metrics(a), metrics(b)
    def ok(got: dict) -> dict:
        return {dict(labels)["route"]: v for (name, labels), v in got.items()
                if name == "disagg_requests_total" and dict(labels)["status"] == "ok" and v}
    # a's remote prefills may fall back to local on a loaded machine; never b's
    assert sum(ok(got_a).values()) == 3 and set(ok(got_a)) <= {"remote", "fallback"}, ok(got_a)
    assert ok(got_b) == {"local": 3}
    for got in (got_a, got_b):                  # each router hears both nodes' heartbeats
        assert got[("disagg_nodes", frozenset({"role": "decode", "state": "up"}.items()))] == 1

    dec, pre = _node_metrics(nodes["decode"]), _node_metrics(nodes["prefill"])
    assert dec[("disagg_engine_info", frozenset({"role": "decode", "node_id": "decode-0"}.items()))] == 1
    assert dec[("disagg_engine_steps_total", frozenset())] > 0
    assert dec[("disagg_engine_decode_tokens_total", frozenset())] >= 6 * 11
    sent = pre[("disagg_engine_kv_transfer_bytes_total", frozenset({"direction": "sent"}.items()))]
    received = dec[("disagg_engine_kv_transfer_bytes_total",
                    frozenset({"direction": "received"}.items()))]
    assert sent > 0 and received > 0
    if "fallback" not in ok(got_a):             # every remote prefill's KV, all of it
        assert received == sent
    else:                                       # a fallen-back request's KV may be dropped
        assert received <= sent


@needs_smollm2
@pytest.mark.slow
def test_a_stuck_rank_fails_liveness_and_a_lost_router_leaves_the_other_serving(deployment):
    a, b = deployment["routers"]
    nodes, procs = deployment["nodes"], deployment["procs"]
    ranks = [c for c in psutil.Process(procs["decode"].pid).children(recursive=True)
             if "spawn" in " ".join(c.cmdline())]
    assert len(ranks) >= 2, [c.cmdline() for c in ranks]
    prompt = random_prompts(1, 49152, 40, 41, seed=22)[0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ranks[-1].suspend()                    # the engine's next step waits on it forever
        try:
            pending = pool.submit(_complete, b, prompt)
            r = _wait(lambda: (x := _get(nodes["decode"] + "/livez")) is not None
                      and x.status_code == 503 and x, STALL_S + 30)
            assert "no progress" in r.json()["reason"]
            # heartbeats go on (own thread): the routers still count the node as ready
            assert httpx.get(b + "/health", timeout=5).json()["nodes"]["decode-0"]
        finally:
            ranks[-1].resume()
        text = pending.result(timeout=120)
    _wait(lambda: _get(nodes["decode"] + "/livez").status_code == 200, 30)
    assert text == _complete(a, prompt)        # the stalled request finished exactly

    # a router that does not run (SIGSTOP, a paused VM) past its node timeout (5 s) hears
    # no heartbeat meanwhile; resumed, it must not take that for the nodes' deaths
    procs["router-a"].send_signal(signal.SIGSTOP)
    time.sleep(7)
    procs["router-a"].send_signal(signal.SIGCONT)
    assert _complete(a, prompt) == text
    log = (deployment["tmp"] / "router-a.log").read_text()
    assert "did not run for" in log and "stopped answering" not in log

    procs["router-a"].kill()
    procs["router-a"].wait(10)
    prompts = random_prompts(2, 49152, 150, 200, seed=23)
    assert all(_complete(b, p) for p in prompts)               # b serves on
    assert _get(nodes["decode"] + "/readyz").status_code == 200  # registered with b
    for node, role in (("decode-0", "decode"), ("prefill-0", "prefill")):
        assert wait_metric(b, "disagg_node_requests", lambda v: v == 0, 20,
                           node=node, role=role) == 0
        assert wait_metric(b, "disagg_node_kv_blocks_used", lambda v: v == 0, 20,
                           node=node, role=role) == 0

"""A node's life with real processes on SmolLM2: a decode node drained by SIGTERM under
streaming load (then the router's own SIGTERM), a router SIGKILLed and started again
on the same addresses (the nodes re-register by themselves, drop the old router's
requests, and hold nothing once quiet), 503 + ``Retry-After`` with no decode node.

The unit-level parts: ``test_node_server_lifecycle.py`` (the node loop) and
``test_router_node_life.py`` (the router's handlers).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import needs_smollm2, random_prompts
from serving_helpers import MODEL, metric, metrics, running_cluster, wait_metric

REPO = Path(__file__).resolve().parents[1]


def _stream(url: str, prompt: list[int], max_tokens: int,
            started: threading.Event | None = None) -> tuple[int | None, str | None, list]:
    """A streaming completion: (completion tokens as its usage says, finish reason, error
    events). ``started`` is set once its first chunk arrived."""
    tokens, finish, errors = None, None, []
    with httpx.stream("POST", url + "/v1/completions", timeout=180, json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if started is not None:
                started.set()
            if "error" in chunk:
                errors.append(chunk["error"])
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                finish = chunk["choices"][0].get("finish_reason") or finish
    return tokens, finish, errors


def _held(url: str, node: str, role: str = "decode") -> float:
    return metric(url, "disagg_node_requests", node=node, role=role)


def _wait_log(path: Path, text: str, timeout_s: float = 30.0) -> bool:
    """Whether ``text`` shows up in the log at ``path`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _nothing_held(url: str, nodes: dict, timeout_s: float = 20.0) -> dict:
    """Wait until every node's leak gauges read 0; return the last readings."""
    names = ("disagg_node_requests", "disagg_node_kv_blocks_used",
             "disagg_node_pinned_requests", "disagg_node_kv_sends")
    deadline = time.monotonic() + timeout_s
    while True:
        got = metrics(url)
        left = {(name, node): got.get((name, frozenset({"node": node, "role": role}.items())))
                for name in names for node, role in nodes.items()}
        if all(v == 0 for v in left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


@needs_smollm2
@pytest.mark.slow
def test_sigterm_drains_a_decode_node_then_the_router(tmp_path_factory):
    # a grace period long enough for a loaded 2-core machine: the point is that the node
    # leaves when its requests are done, not when the period ends
    with contextlib.closing(running_cluster(tmp_path_factory, policy="local", num_prefill=0,
                                            num_decode=2,
                                            decode_args=("--drain-timeout-s", "150"),
                                            router_args=("--drain-timeout-s", "150"))) as cluster:
        c = next(cluster)
        url, log_dir = c.http_url, Path(c.config.log_dir)
        prompts = random_prompts(4, 49152, 20, 30, seed=21)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            streams = [pool.submit(_stream, url, p, 32) for p in prompts]
            deadline = time.monotonic() + 60
            while not (_held(url, "decode-0") and _held(url, "decode-1")):   # both busy
                assert time.monotonic() < deadline, metrics(url)
                time.sleep(0.1)
            victim = c.procs["decode-0"]
            t0 = time.monotonic()
            victim.send_signal(signal.SIGTERM)
            assert wait_metric(url, "disagg_nodes", lambda v: v == 1, timeout_s=60,
                               role="decode", state="draining") == 1
            assert c.health()["nodes"]["decode-0"]["state"] == "draining"
            # new work while it drains goes to the other node, straight away
            late = pool.submit(_stream, url, prompts[0], 8)
            assert late.result(timeout=120) == (8, "length", [])
            code = victim.wait(timeout=180)
            drained_s = time.monotonic() - t0
            results = [s.result(timeout=120) for s in streams]
        assert code == 0 and drained_s < 150, (code, drained_s)
        assert results == [(32, "length", [])] * 4, results
        assert "decode-0" not in c.health()["nodes"]
        assert metric(url, "disagg_nodes", role="decode", state="up") == 1
        assert metric(url, "disagg_nodes", role="decode", state="down") == 0
        log = (log_dir / "decode-0.log").read_text()
        assert "draining:" in log and "drained: nothing left" in log and "refused" not in log
        after = _stream(url, prompts[1], 8)
        assert after == (8, "length", [])
        print(f"\ndecode-0 drained and exited {drained_s:.1f} s after SIGTERM")

        # the router's SIGTERM: no new connections, the stream in flight runs to its end
        router, started = c.procs["router"], threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            last = pool.submit(_stream, url, prompts[2], 64, started)
            assert started.wait(120)
            router.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(url + "/health", timeout=5)
                except (httpx.ConnectError, httpx.RemoteProtocolError):
                    # refused, or (a connection the kernel queued just before the listening
                    # socket closed) closed unanswered: either way no new request is served
                    break
                assert time.monotonic() < deadline, "the router still accepts connections"
                time.sleep(0.05)
            assert not last.done()                  # it was still streaming when refused...
            assert last.result(timeout=150) == (64, "length", [])      # ...and ran to its end
        assert router.wait(timeout=60) == 0


@needs_smollm2
@pytest.mark.slow
def test_router_restart_on_the_same_address(tmp_path_factory):
    with contextlib.closing(running_cluster(tmp_path_factory, policy="remote", num_prefill=1,
                                            num_decode=1)) as cluster:
        c = next(cluster)
        url, log_dir = c.http_url, Path(c.config.log_dir)
        old_id = c.health()["router_id"]
        prompts = random_prompts(3, 49152, 60, 80, seed=31)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(_stream, url, p, 400) for p in prompts]
            deadline = time.monotonic() + 60
            while _held(url, "decode-0") < 3:
                assert time.monotonic() < deadline, metrics(url)
                time.sleep(0.1)
            c.kill("router")                                   # SIGKILL, streams in flight
            for s in streams:
                with pytest.raises(httpx.HTTPError):
                    s.result(timeout=60)
        t0 = time.monotonic()
        c.restart_router()                       # same control address and HTTP port
        rejoined_s = time.monotonic() - t0
        assert c.http_url == url
        health = c.health()
        assert health["router_id"] != old_id
        assert {n: s["state"] for n, s in health["nodes"].items()} == {
            "prefill-0": "up", "decode-0": "up"}
        for node in ("decode-0", "prefill-0"):     # the Registered reached it, or is on its way
            assert _wait_log(log_dir / f"{node}.log", " restarted ("), node
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda p: _stream(url, p, 12), prompts[:2]))
        assert done == [(12, "length", [])] * 2
        # both prefilled remotely: no transfer tripped over one of the old router's (its
        # request ids are the new router's own, so they cannot be mistaken for old ones)
        assert metric(url, "disagg_requests_total", route="remote", status="ok") == 2
        assert not any(v for (name, _), v in metrics(url).items()
                       if name == "disagg_fallbacks_total"), metrics(url)
        left = _nothing_held(url, {"decode-0": "decode", "prefill-0": "prefill"})
        assert all(v == 0 for v in left.values()), left
        assert metric(url, "disagg_node_restarts_total", role="decode") == 0
        print(f"\nnodes re-registered with the new router {rejoined_s:.1f} s after its start")


def test_no_decode_node_means_503_with_retry_after(tmp_path):
    ready = tmp_path / "router.json"
    proc = subprocess.Popen([sys.executable, "-m", "router", "--port", "0", "--ready-file",
                             str(ready), "--drain-timeout-s", "5"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        url = json.loads(ready.read_text())["http"]
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_decode_node"
        assert int(r.headers["Retry-After"]) >= 1
        h = httpx.get(url + "/health", timeout=30)
        assert h.status_code == 503 and int(h.headers["Retry-After"]) >= 1
        assert h.json()["nodes"] == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_timeout_flags_are_validated():
    for module in ("router", "decode_node"):
        r = subprocess.run([sys.executable, "-m", module, "--router", "tcp://127.0.0.1:1",
                            "--drain-timeout-s", "-1"] if module != "router" else
                           [sys.executable, "-m", module, "--drain-timeout-s", "-1"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--drain-timeout-s must be >= 0" in r.stderr, r.stderr
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert "--drain-timeout-s" in r.stdout

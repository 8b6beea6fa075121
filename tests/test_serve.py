"""``disagg serve`` as a user runs it (real processes on the embedded model), and the
per-role launch scripts.

Each serve test starts ``python -m disagg.cli serve --port 0`` in its own session
(process group), so a terminal's Ctrl-C can be reproduced with ``killpg`` and
"no orphans" means "the process group is empty" once ``disagg serve`` exited.
The two tests that start the whole deployment take about 15-60 s each on 2 CPU
cores (one kills the decode node and waits for serve to restart it), hence
``slow``; the rest take seconds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import needs_smollm2
from disagg.cpus import format_cpus, usable_cpus
from disagg.layout import Layout, plan_layout
from disagg.serve import (WORKERS_LINE, RestartBackoff, add_serve_args,
                          cluster_config_from_args)
from serving_helpers import SERVE, Serve, metric, wait_metric

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "scripts" / f"launch_{role}.sh" for role in ("router", "prefill", "decode")]


def _flag(pid: int, flag: str) -> str | None:
    """The value of ``flag`` on process ``pid``'s command line (None: not given)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return args[args.index(flag) + 1] if flag in args else None


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@needs_smollm2
@pytest.mark.slow
def test_serve_completes_then_ctrl_c_stops_everything():
    serve = Serve()
    try:
        m = serve.wait_ready()
        url, model, pids = m.group(1), m.group(2), [int(p) for p in m.groups()[2:]]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":8000/v1")
        assert "curl " + url + "/chat/completions" in serve.output
        if plan_layout(usable_cpus()).shared():     # too few cores to split: the nodes take turns
            turns = [_flag(pid, "--compute-turns") for pid in pids[1:]]
            assert turns[0] is not None and turns[0] == turns[1], turns
            assert os.path.exists(turns[0] + ".turn")
        r = httpx.post(url + "/completions", timeout=120, json={
            "model": model, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
        # A terminal's Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(serve.proc.pid, signal.SIGINT)
        assert serve.wait_exit(30) == 0, serve.output
        assert "disagg serve: stopped" in serve.output
        assert "unexpectedly" not in serve.output
        assert all(gone(pid) for pid in pids), serve.output
        assert not serve.group_alive()
    finally:
        serve.kill_all()


@needs_smollm2
@pytest.mark.slow
def test_serve_restarts_a_dead_node_and_exits_1_when_a_router_worker_dies():
    serve = Serve("--policy", "local", "--router-workers", "2")
    try:
        m = serve.wait_ready()
        url, model = m.group(1), m.group(2)
        base = url.removesuffix("/v1")
        router, prefill, decode = (int(p) for p in m.groups()[2:])
        workers = re.search("2 " + re.escape(WORKERS_LINE) + r"router \(pid (\d+)\) (\S+), "
                            r"router-1 \(pid (\d+)\) (\S+)\n", serve.output)
        assert workers and int(workers.group(1)) == router, serve.output
        own, second = [workers.group(2), workers.group(4)], int(workers.group(3))
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4,
                "temperature": 0}
        # the shared port spreads connections over both workers; every answer is the same
        texts = {httpx.post(url + "/completions", json=dict(body, max_tokens=1),
                            timeout=120).json()["choices"][0]["text"] for _ in range(16)}
        assert len(texts) == 1
        # the shared port reaches both workers (each new connection goes to one of them)
        assert len({httpx.get(base + "/health", timeout=30).json()["router_id"]
                    for _ in range(16)}) == 2
        # each worker's /metrics counts both workers' requests (a shared metrics directory)
        served = [metric(u, "disagg_requests_total", route="local", status="ok")
                  for u in (base, *own)]
        assert served == [16, 16, 16], served
        os.kill(decode, signal.SIGKILL)
        # while it is away: 503 with Retry-After (no decode node), then answers again
        deadline = time.monotonic() + 60
        while any(httpx.get(u + "/health", timeout=30).json()["decode_nodes"] for u in own):
            assert time.monotonic() < deadline, serve.output
            time.sleep(0.05)
        r = httpx.post(url + "/completions", json=body, timeout=120)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        deadline = time.monotonic() + 240
        while (r := httpx.post(url + "/completions", json=body, timeout=120)).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, (r.text, serve.output)
            time.sleep(0.25)
        assert r.json()["choices"][0]["text"].strip()
        assert re.search(rf"decode-0 \(pid {decode}\) exited unexpectedly with code -9 after "
                         r"\d+ s; restarting it in 1 s", serve.output), serve.output
        new = int(re.search(r"decode-0 restarted \(pid (\d+)\)", serve.output).group(1))
        assert new != decode and not gone(new)
        for u in own:                       # each worker saw the node come back
            assert wait_metric(u, "disagg_node_restarts_total", lambda v: v == 1,
                               role="decode") == 1
            assert metric(u, "disagg_node_restarts_total", role="prefill") == 0
        # only a router worker's death ends serve: exit 1, every node stopped
        os.kill(second, signal.SIGKILL)
        assert serve.wait_exit(60) == 1, serve.output
        assert re.search(rf"router-1 \(pid {second}\) exited unexpectedly with code -9; "
                         "stopping the nodes", serve.output), serve.output
        assert gone(prefill) and gone(new) and gone(router)
        assert not serve.group_alive()
    finally:
        serve.kill_all()


def test_restart_backoff_doubles_caps_and_resets_after_a_stable_run():
    backoff = RestartBackoff(first_s=1, max_s=30, stable_s=60)
    assert [backoff.delay("decode-0", 2.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay("prefill-0", 0.5) == 1                 # per node
    assert backoff.delay("decode-0", 61.0) == 1                 # it stayed up a minute
    assert backoff.delay("decode-0", 3.0) == 2
    for bad in ({"first_s": 0}, {"first_s": 40}, {"stable_s": 0}):
        with pytest.raises(ValueError, match="first_s"):
            RestartBackoff(**bad)


def test_serve_startup_failure_exits_2_without_orphans(tmp_path):
    serve = Serve("--model", str(tmp_path / "no-such-model"))
    try:
        assert serve.wait_exit(120) == 2, serve.output
        assert "disagg serve: error: start-up failed: router exited with code" in serve.output
        assert "disagg serve ready" not in serve.output
        # the layout, one line per process, came first
        cores = format_cpus(usable_cpus())
        assert f"router    cores {cores} (not pinned)" in serve.output
        assert re.search(r"prefill-0 cores [\d,-]+", serve.output), serve.output
        assert re.search(r"decode-0  cores [\d,-]+", serve.output), serve.output
        assert not serve.group_alive()
    finally:
        serve.kill_all()


def test_serve_rejects_bad_flags_before_starting_anything():
    r = subprocess.run([*SERVE[:4], "--port", "70000"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "--port must be in 0..65535" in r.stderr
    assert "starting router" not in r.stderr


def test_launch_scripts_parse_and_need_a_router_address(tmp_path):
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        text = script.read_text()
        assert "set -euo pipefail" in text and 'exec "$PY" -m' in text
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    # A python that would only record its arguments: nothing may reach it without a router.
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")}
    env["DISAGG_PYTHON"] = str(fake)
    for role in ("prefill", "decode"):
        script = str(REPO / "scripts" / f"launch_{role}.sh")
        r = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "DISAGG_ROUTER" in r.stderr, r.stderr
        assert not (tmp_path / "args").exists()
        # With the address (and DISAGG_TP mapped to --tp) the script execs the node module.
        r = subprocess.run([script, "--max-num-seqs", "2"], capture_output=True, text=True,
                           env=dict(env, DISAGG_ROUTER="tcp://10.0.0.5:7100", DISAGG_TP="3"),
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "args").read_text().split() == [
            "-m", f"{role}_node", "--tp", "3", "--max-num-seqs", "2"]
        (tmp_path / "args").unlink()


# ---- process layout ---------------------------------------------------------

@pytest.mark.parametrize("n, prefill, decode", [
    (2, None, None),                    # too small to split: both share every core
    (4, (0, 1), (2, 3)),
    (8, (0, 1, 2, 3), (4, 5, 6, 7)),
    (16, tuple(range(8)), tuple(range(8, 16))),
])
def test_layout_rule(n, prefill, decode):
    layout = plan_layout(range(n))
    assert (layout.prefill, layout.decode) == (prefill, decode)
    lines = layout.describe()
    assert lines[0] == f"router    cores 0-{n - 1} (not pinned)"
    if prefill is None:
        assert lines[1:3] == ["prefill-0 cores 0-1 (not pinned)", "decode-0  cores 0-1 (not pinned)"]
        assert lines[3].startswith("nodes share cores 0-1: they take turns at compute, and the "
                                   "router's cost model knows")
        assert layout.node_args("prefill") == layout.node_args("decode") == ()
    else:
        assert lines[1:3] == [f"prefill-0 cores {format_cpus(prefill)}",
                              f"decode-0  cores {format_cpus(decode)}"]
        assert lines[3].startswith("nodes on disjoint cores")
        assert layout.node_args("decode") == ("--cpus", format_cpus(decode))


def test_layout_follows_tp_and_the_usable_cores():
    assert plan_layout(range(8), prefill_tp=2).prefill == (0, 1, 2, 3, 4)   # 2 ranks : 1 rank
    assert plan_layout(range(4), prefill_tp=2).prefill is None              # 1 core per rank: share
    odd = plan_layout([3, 5, 6, 7, 9])                                      # a restricted mask
    assert (odd.prefill, odd.decode) == ((3, 5), (6, 7, 9))


def test_layout_flags_override_the_rule():
    layout = plan_layout(range(8), prefill_cpus="0-1")
    assert (layout.prefill, layout.decode) == ((0, 1), (2, 3, 4, 5, 6, 7))   # decode: the rest
    layout = plan_layout(range(2), decode_cpus="1")
    assert (layout.prefill, layout.decode) == ((0,), (1,))
    layout = plan_layout(range(8), prefill_cpus="all")
    assert (layout.prefill, layout.decode) == (None, None)
    layout = plan_layout(range(8), prefill_cpus="0-5", decode_cpus="all")
    assert (layout.prefill, layout.decode, layout.shared()) == ((0, 1, 2, 3, 4, 5), None,
                                                                 (0, 1, 2, 3, 4, 5))
    overlap = plan_layout(range(8), prefill_cpus="0-4", decode_cpus="4-7")
    assert overlap.shared() == (4,)
    assert overlap.describe()[3].startswith("nodes share cores 4:")
    with pytest.raises(ValueError, match="not usable"):
        plan_layout(range(4), prefill_cpus="2-5")
    with pytest.raises(ValueError, match="none left"):
        plan_layout(range(2), prefill_cpus="0-1")
    with pytest.raises(ValueError, match="0-3,8"):
        plan_layout(range(4), decode_cpus="two")
    with pytest.raises(ValueError, match="subset"):
        Layout((0, 1), (), None)


def test_cluster_config_pins_the_nodes():
    import argparse
    p = argparse.ArgumentParser()
    add_serve_args(p)
    a = p.parse_args(["--port", "0", "--max-num-seqs", "2"])
    config = cluster_config_from_args(a, plan_layout(range(8)))
    assert config.prefill_args == ("--cpus", "0-3") and config.decode_args == ("--cpus", "4-7")
    assert config.node_args == ("--drain-timeout-s", "30.0", "--max-num-seqs", "2")
    assert not config.compute_turns                     # disjoint cores: no turns
    shared = cluster_config_from_args(a, plan_layout(range(2)))
    assert shared.prefill_args == shared.decode_args == ()
    assert shared.compute_turns                         # shared cores: the nodes take turns
    overlap = cluster_config_from_args(a, plan_layout(range(8), prefill_cpus="0-4",
                                                      decode_cpus="4-7"))
    assert overlap.compute_turns
    gpu = cluster_config_from_args(p.parse_args(["--port", "0", "--device", "cuda"]),
                                   plan_layout(range(2)))
    assert not gpu.compute_turns                        # GPU compute: no turns on the cores
    assert "take turns" not in plan_layout(range(2)).describe(turns=False)[3]


def test_serve_passes_the_fault_flags_to_the_router_and_nodes():
    import argparse
    p = argparse.ArgumentParser()
    add_serve_args(p)
    a = p.parse_args(["--node-timeout-s", "2", "--max-migrations", "1", "--migration-wait-s",
                      "5", "--drain-timeout-s", "7"])
    config = cluster_config_from_args(a)
    assert config.node_timeout_s == 2.0
    assert config.router_args == ("--max-migrations", "1", "--migration-wait-s", "5.0",
                                  "--drain-timeout-s", "7.0")
    assert config.node_args[:2] == ("--drain-timeout-s", "7.0")
    for bad in (["--max-migrations", "-1"], ["--migration-wait-s", "0"],
                ["--drain-timeout-s", "-1"], ["--node-timeout-s", "0"]):
        with pytest.raises(ValueError):
            cluster_config_from_args(p.parse_args(bad))


def test_serve_help_documents_the_layout_flags():
    r = subprocess.run([*SERVE[:4], "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "--prefill-cpus CPUS" in text and "--decode-cpus CPUS" in text
    assert "'all' = not pinned" in text and "split the cores between the nodes" in text

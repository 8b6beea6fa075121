"""Faults through real processes: SIGKILL the prefill node with requests in flight; every
request still completes correctly (local fallback), and a restarted prefill node is used.
On shared cores, a prefill node stopped in its compute turn does not freeze the decode node."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import pytest

from conftest import needs_smollm2, random_prompts
from disagg.chaos import stop_in_turn
from disagg.engine.compute_turns import turn_holders
from serving_helpers import (
    greedy_tokens, metric, metrics, reference, running_cluster, wait_metric)

pytestmark = [needs_smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, policy="remote", node_timeout_s=1.5)


def test_prefill_node_killed_mid_flight_then_restarted(cluster, smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    url = cluster.http_url
    # long prompts queue up on the prefill node, so the kill lands mid-prefill
    prompts = random_prompts(4, 49152, 300, 400, seed=11)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(greedy_tokens, url, p, 12) for p in prompts]
        time.sleep(0.5)
        cluster.kill("prefill-0")
        results = [f.result(timeout=120) for f in futures]
    for prompt, got in zip(prompts, results):
        assert got == reference(smollm2_dir, tok, prompt, 12)
    assert metric(url, "disagg_requests_total", route="fallback", status="ok") >= 1
    assert sum(v for (name, _), v in metrics(url).items()
               if name == "disagg_fallbacks_total") >= 1
    assert wait_metric(url, "disagg_nodes", lambda v: v == 0, role="prefill", state="up") == 0
    assert metric(url, "disagg_nodes", role="prefill", state="down") == 1

    remote = metric(url, "disagg_requests_total", route="remote", status="ok")
    cluster.start_node("prefill", tp=1)
    prompt = random_prompts(1, 49152, 40, 41, seed=12)[0]
    assert greedy_tokens(url, prompt, 8) == reference(smollm2_dir, tok, prompt, 8)
    assert metric(url, "disagg_requests_total", route="remote", status="ok") == remote + 1


def test_silent_node_is_dropped_and_taken_back(cluster):
    import signal
    url = cluster.http_url
    name = next(n for n in cluster.procs if n.startswith("prefill"))
    proc = cluster.procs[name]
    proc.send_signal(signal.SIGSTOP)                 # alive but silent
    try:
        assert wait_metric(url, "disagg_nodes", lambda v: v == 0, role="prefill", state="up") == 0
        assert cluster.health()["prefill_nodes"] == 0
    finally:
        proc.send_signal(signal.SIGCONT)
    assert wait_metric(url, "disagg_nodes", lambda v: v == 1, role="prefill", state="up") == 1
    assert cluster.health()["prefill_nodes"] == 1


@pytest.fixture(scope="module")
def shared_cores(tmp_path_factory):
    """The deployment ``disagg serve`` makes on a small machine: both nodes on the same
    cores, taking turns at compute; the decode node waits 1 s at most for a turn."""
    yield from running_cluster(tmp_path_factory, policy="remote", node_timeout_s=1.5,
                               compute_turns=True, decode_args=("--compute-turn-wait-s", "1"))


def test_a_prefill_node_stopped_in_its_turn_does_not_freeze_the_decode_node(shared_cores,
                                                                            smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    url, prefill = shared_cores.http_url, shared_cores.procs["prefill-0"]
    path = shared_cores.turns_path
    long_prompts = random_prompts(6, 49152, 700, 800, seed=21)
    short = random_prompts(1, 49152, 20, 30, seed=22)[0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        caught = None
        for prompt in long_prompts:          # until a prefill is caught holding its turn
            future = pool.submit(greedy_tokens, url, prompt, 8)
            if stop_in_turn(prefill, path, lambda: not future.done()):
                caught = prompt
                break
            future.result(timeout=120)
        assert caught is not None, "the prefill node was never caught in its compute turn"
        try:
            # the router drops the silent prefill node; its request and a new one prefill
            # on the decode node, which computes without the turn the stopped node holds
            got_long = future.result(timeout=90)
            got_short = pool.submit(greedy_tokens, url, short, 8).result(timeout=60)
            assert prefill.pid in turn_holders(path), "the stopped node let go of its turn"
        finally:
            prefill.send_signal(signal.SIGCONT)
    assert got_long == reference(smollm2_dir, tok, caught, 8)
    assert got_short == reference(smollm2_dir, tok, short, 8)
    log = (Path(shared_cores.config.log_dir) / "decode-0.log").read_text()
    assert "not granted in 1 s" in log

"""Faults through real processes: SIGKILL the prefill node with requests in flight; every
request still completes correctly (local fallback), and a restarted prefill node is used."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from conftest import needs_smollm2, random_prompts
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

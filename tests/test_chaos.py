"""Chaos: router + 2 decode nodes + 1 prefill node as real processes, an open-loop stream of
greedy streaming requests, and nodes SIGKILLed (then restarted under the same id) or
SIGSTOPped (some past the router's node timeout) at seeded random moments.

Must hold: 0 failed requests; every output identical to a no-fault run of the same requests;
afterwards no KV blocks, requests, pins or KV sends left on any node (the engines' own
counters, read from the router's /metrics). Scaled to fit CI: about 22 s of arrivals under faults.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from conftest import needs_smollm2
from disagg.chaos import ChaosConfig, FaultInjector, wait_quiescent
from disagg.cluster import ClusterConfig, LocalCluster
from disagg.replay.loadgen import TargetConfig, replay
from disagg.replay.shaping import ShapedRequest
from serving_helpers import MODEL, metrics

pytestmark = [needs_smollm2, pytest.mark.slow]

SEED = 20261129
NUM_REQUESTS, RATE = 18, 0.8          # ~22 s of arrivals


def open_loop_requests(seed: int) -> list[ShapedRequest]:
    """Poisson arrivals at ``RATE``; prompts of 24..300 random ids (the threshold policy
    sends the long ones to the prefill node), 12..32 output tokens."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(24, 300))]
        out.append(ShapedRequest(t, prompt, rng.randint(12, 32), i))
        t += rng.expovariate(RATE)
    return out


def counter_total(url: str, name: str) -> float:
    return sum(v for (n, _), v in metrics(url).items() if n == name)


def test_chaos_no_failed_requests_exact_outputs_no_leaks(tmp_path):
    # A fault every ~3 s hits a request several times over its life on a slow machine:
    # one CI run saw three requests stopped on decode-1, moved to decode-0, stopped there
    # too, and give up at the default budget of 3 migrations. The property under test is
    # that every fault is survived, so the budget is sized to the storm, not the default.
    # Three engines on CI's two cores, without turns: one torch thread each, or their
    # OpenMP teams spin against each other (the no-fault pass alone took 37 to 72 s
    # with a team per core, 23 s with one thread each).
    cfg = ClusterConfig(num_prefill=1, num_decode=2, policy="threshold",
                        policy_options=("min_remote_tokens=128",), log_dir=str(tmp_path),
                        node_args=("--kv-cache-memory", "64MiB", "--torch-threads", "1"),
                        router_args=("--max-migrations", "8"))
    requests = open_loop_requests(SEED)
    with LocalCluster(cfg) as cluster:
        cluster.start()
        target = TargetConfig(base_url=cluster.http_url, model=MODEL, timeout_s=300)
        # the no-fault reference needs no open-loop timing: all sent at once
        calm = replay([dataclasses.replace(r, send_at_s=0.0) for r in requests],
                      target, show_progress=False)
        assert [r.status for r in calm.results].count("ok") == NUM_REQUESTS, \
            [r.error for r in calm.results if r.status != "ok"]
        want = {r.request_id: r.text for r in calm.results}

        injector = FaultInjector(cluster, ChaosConfig(seed=SEED, mean_gap_s=3.0,
                                                      stop_s=(1.0, 5.0))).start()
        try:
            stormy = replay(requests, target, show_progress=False)
        finally:
            faults = injector.stop()
        print("faults:", [(round(f.at_s, 1), f.action, f.node, round(f.down_s, 1))
                          for f in faults])
        failed = [(r.request_id, r.error) for r in stormy.results if r.status != "ok"]
        assert not failed, f"{len(failed)} failed under faults {faults}: {failed}"
        got = {r.request_id: r.text for r in stormy.results}
        assert len(got) == NUM_REQUESTS
        differ = [rid for rid in want if got[rid] != want[rid]]
        assert not differ, [(rid, want[rid], got[rid]) for rid in differ]
        assert len(faults) >= 3 and {f.action for f in faults} == {"kill", "stop"}
        url = cluster.http_url
        recovered = counter_total(url, "disagg_migrations_total") + \
            counter_total(url, "disagg_fallbacks_total")
        assert recovered >= 1, "no request was ever migrated or fell back: the faults missed"

        cluster.wait_nodes(1, 2, deadline=time.monotonic() + 120)
        nodes = [n for n in cluster.procs if n != "router"]
        held = wait_quiescent(url, nodes, timeout_s=60)
        leaks = {n: {g: v for g, v in held.get(n, {}).items() if v} for n in nodes}
        assert all(n in held for n in nodes), f"nodes missing from /metrics: {held}"
        assert not any(leaks.values()), f"left behind after the storm: {leaks}"

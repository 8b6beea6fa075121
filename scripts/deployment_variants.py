"""Does any part of the conditional deployment cost time on a machine too small to split?

    .venv/bin/python scripts/deployment_variants.py [--rate 0.6] \
        [--order colo,cond,two-local,colo+turns,colo,cond,two-local,colo+turns] [--out F]

On 2 cores ``disagg serve``'s default deployment (``cond``: router with the cost
policy, a prefill and a decode node on the same cores taking turns at compute)
sends every prompt local, so it computes what ``disagg experiment``'s colocated
mode (``colo``: the decode node alone, policy local) computes. What it adds is an
idle prefill node, the turn lock around every step and the cost policy. This
replays ``disagg experiment``'s shaped trace (its defaults: Azure conversation,
40 requests) at one rate against deployments that add those parts one at a time,
in the order given (repeat names to alternate them on a drifting machine), each
started fresh and warmed up like the experiment's::

    colo         decode node alone on every core, policy local
    colo+turns   the same, its steps taking the turn lock (nobody to take turns with)
    two-local    an idle prefill node beside it on the same cores, policy local, no turns
    cond         the default deployment: both nodes, turns, the cost policy

Prints one line per run (TTFT / TPOT / E2E p50, run length) and, at the end, per
variant the median over its runs; ``--out`` writes every request's TTFT, TPOT and
E2E per run as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from disagg.cluster import ClusterConfig, LocalCluster
from disagg.cpus import format_cpus, usable_cpus
from disagg.replay.commands import run_one, served_model, shape_runs, slo_bounds
from disagg.replay.experiment import add_experiment_args, warm_up
from disagg.replay.loadgen import TargetConfig


def variants(cpus: str) -> dict[str, ClusterConfig]:
    """The deployments compared, all on ``cpus`` (see the module docstring)."""
    common = dict(kv_transport="shm", node_args=("--dtype", "float32"))
    alone = dict(num_prefill=0, policy="local", decode_args=("--cpus", cpus))
    both = dict(num_prefill=1, prefill_args=("--cpus", cpus), decode_args=("--cpus", cpus))
    return {"colo": ClusterConfig(**alone, **common),
            "colo+turns": ClusterConfig(**alone, compute_turns=True, **common),
            "two-local": ClusterConfig(**both, policy="local", **common),
            "cond": ClusterConfig(**both, policy="cost", compute_turns=True, **common)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", default="0.6", help="offered rate, req/s (default 0.6)")
    p.add_argument("--order", default="colo,cond,two-local,colo+turns,colo,cond,two-local,colo+turns",
                   help="variants to run, in this order (names may repeat)")
    p.add_argument("--out", default=None, help="write every request's figures here (JSON)")
    a = p.parse_args()
    cpus = format_cpus(usable_cpus())
    known = variants(cpus)
    order = [v.strip() for v in a.order.split(",") if v.strip()]
    unknown = [v for v in order if v not in known]
    if unknown or not order:
        p.error(f"--order takes names among {', '.join(known)}; got {a.order!r}")
    shaping = argparse.ArgumentParser()
    add_experiment_args(shaping)
    trace = shaping.parse_args(["--rates", a.rate])
    (rate, requests), = shape_runs(trace)
    slo = slo_bounds(trace)
    per_request: dict[str, list[dict]] = {}
    figures: dict[str, list[tuple[float, float, float]]] = {}
    for i, name in enumerate(order, 1):
        print(f"[variants] {name} ({i}/{len(order)}): starting on cores {cpus}", file=sys.stderr,
              flush=True)
        with LocalCluster(known[name]) as cluster:
            cluster.start()
            target = TargetConfig(base_url=cluster.http_url,
                                  model=served_model(cluster.http_url, {}), timeout_s=600.0)
            warm_up(target, requests, 3)
            rec = run_one(requests, target, name, rate, slo)
        s = rec.summary
        if s["num_errors"]:
            print(f"[variants] {name}: {s['num_errors']} requests failed: {s['errors']}",
                  file=sys.stderr)
            return 1
        row = (1000 * s["ttft_s"]["p50"], 1000 * s["tpot_s"]["p50"], s["e2e_s"]["p50"])
        figures.setdefault(name, []).append(row)
        per_request.setdefault(name, []).append(
            {x.request_id: [x.ttft, x.tpot, x.e2e] for x in rec.run.results})
        print(f"{name}: TTFT p50 {row[0]:.0f} ms, TPOT p50 {row[1]:.1f} ms, E2E p50 "
              f"{row[2]:.2f} s, run {s['duration_s']:.2f} s", flush=True)
    for name, rows in figures.items():
        ttft, tpot, e2e = (statistics.median(col) for col in zip(*rows))
        print(f"median of {len(rows)} run(s), {name}: TTFT p50 {ttft:.0f} ms, TPOT p50 "
              f"{tpot:.1f} ms, E2E p50 {e2e:.2f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"rate": rate, "order": order,
                                           "runs": per_request}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

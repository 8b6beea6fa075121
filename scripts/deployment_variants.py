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
from dataclasses import replace
from pathlib import Path

from disagg.cluster import ClusterConfig, LocalCluster
from disagg.config import resolve_dtype
from disagg.cpus import format_cpus, usable_cpus
from disagg.replay.commands import run_one, served_model, shape_runs, slo_bounds
from disagg.replay.experiment import add_experiment_args, mode_config, warm_up
from disagg.replay.loadgen import TargetConfig


def variants(a: argparse.Namespace, cpus: list[int], dtype: str) -> dict[str, ClusterConfig]:
    """The deployments compared, all on ``cpus`` (see the module docstring): the
    experiment's colocated and conditional modes (``a``: its flags), and each with one
    part of the other."""
    colo = replace(mode_config("colocated", a, cpus, Path("logs"), dtype), log_dir=None)
    cond = replace(mode_config("conditional", a, cpus, Path("logs"), dtype), log_dir=None)
    if cond.prefill_args != cond.decode_args:
        raise ValueError(f"cores {format_cpus(cpus)} are enough to split the nodes; these "
                         "variants are for a machine where they share every core")
    return {"colo": colo, "colo+turns": replace(colo, compute_turns=True),
            "two-local": replace(cond, policy="local", compute_turns=False), "cond": cond}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", default="0.6", help="offered rate, req/s (default 0.6)")
    p.add_argument("--order",
                   default="colo,cond,two-local,colo+turns,colo,cond,two-local,colo+turns",
                   help="variants to run, in this order (names may repeat)")
    p.add_argument("--out", default=None, help="write every request's figures here (JSON)")
    a = p.parse_args()
    shaping = argparse.ArgumentParser()
    add_experiment_args(shaping)
    trace = shaping.parse_args(["--rates", a.rate])
    cpus = usable_cpus()
    try:
        known = variants(trace, cpus, resolve_dtype(trace.dtype, "cpu"))
    except ValueError as exc:
        p.error(str(exc))
    order = [v.strip() for v in a.order.split(",") if v.strip()]
    unknown = [v for v in order if v not in known]
    if unknown or not order:
        p.error(f"--order takes names among {', '.join(known)}; got {a.order!r}")
    (rate, requests), = shape_runs(trace)
    slo = slo_bounds(trace)
    per_request: dict[str, list[dict]] = {}
    figures: dict[str, list[tuple[float, float, float]]] = {}
    for i, name in enumerate(order, 1):
        print(f"[variants] {name} ({i}/{len(order)}): starting on cores {format_cpus(cpus)}",
              file=sys.stderr, flush=True)
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

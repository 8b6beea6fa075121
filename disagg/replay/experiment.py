"""``disagg experiment``: colocated vs always-disaggregated vs conditional, same trace.

Each mode is a fresh deployment on this machine with the same cores in total,
started, warmed up, replayed at every ``--rates`` entry (ascending) and
stopped before the next mode starts::

    colocated       decode node alone (policy local), pinned to every core
    disaggregated   prefill node on half the cores, decode node on the other
                    half, policy remote: every prompt is prefilled remotely
    conditional     the default deployment (``disagg serve``'s): both nodes laid
                    out by ``disagg.layout`` (split when each gets >= 2 cores per
                    rank, else sharing every core), the cost-model router decides
                    per request
    vllm            not a default: the peer series, vllm serve on every core (or
                    any server at --peer-url); see ``peer``

``--control MODE`` deploys MODE a second time after every other series, as
series ``MODE#2`` with the very same configuration: an A/A control. The report
then judges the conditional series' ratios to every other series against how far
the two identical deployments came apart (:mod:`disagg.replay.mode_ratios`).

The router and the load generator are not pinned: they run beside the nodes
in every mode alike. Every node and the peer run ``--dtype`` (auto: resolved
once here, float32 on CPUs without native bfloat16). One report folder
compares the modes side by side (see ``report_files``); ``--rates`` with
several entries finds each mode's highest rate with at least
``--attainment-target`` SLO attainment (DistServe's goodput), and with a peer
the summary sets each mode's against the peer's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from disagg.bench.aa_control import control_name, series_of
from disagg.cluster import ClusterConfig, LocalCluster
from disagg.config import resolve_dtype
from disagg.cpus import parse_cpus, usable_cpus
from disagg.layout import plan_layout
from disagg.engine_args import add_dtype_arg, add_kv_transport_arg
from disagg.replay.commands import (EXPERIMENT_SHAPING, add_shaping_args, offered_rate, run_one,
                                    served_model, shape_runs, slo_bounds)
from disagg.replay.loadgen import TargetConfig, replay
from disagg.replay.mode_ratios import judge, verdict_lines
from disagg.replay.peer import PEER_MODE, PeerConfig, add_peer_args, running_peer, series_plan
from disagg.replay.report_files import RunRecord, peer_comparison, peer_lines, write_report
from disagg.replay.shaping import ShapedRequest
from transport.base import KINDS

MODES = ("colocated", "disaggregated", "conditional")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``disagg experiment`` (defaults fit a 2-core CPU and SmolLM2)."""
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {', '.join(MODES)}, {PEER_MODE} (the peer "
                        "series: vllm serve from `make peers`, or --peer-url)")
    p.add_argument("--model", default="default", help="served model ('default' = SmolLM2)")
    add_dtype_arg(p)
    p.add_argument("--cpus", default=None,
                   help="cores to use in total, e.g. 0-3 (default: all this process may use); "
                        "the disaggregated mode gives the prefill node the first half, the "
                        "conditional mode lays them out as disagg serve does")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="cost-model option for the conditional mode; repeatable")
    # every mode runs on this machine's CPU cores: no cuda_ipc
    add_kv_transport_arg(p, default="shm", kinds=tuple(k for k in KINDS if k != "cuda_ipc"),
                         note="shm (default): shared memory; zmq: sockets")
    p.add_argument("--node-arg", action="append", default=[], metavar="FLAG[=VALUE]",
                   help="extra engine flag for every node, e.g. --node-arg=--max-num-seqs=32")
    p.add_argument("--warmup", type=int, default=3,
                   help="requests sent (not measured) after each deployment starts")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--out", default="results/experiment", help="report folder")
    p.add_argument("--control", default=None, metavar="MODE", choices=MODES,
                   help="an A/A control: deploy MODE (one of --modes) a second time after "
                        "every other series, as series MODE#2; the report judges the "
                        "conditional series against how far the two came apart")
    add_peer_args(p)
    add_shaping_args(p, defaults=EXPERIMENT_SHAPING)


def split_cpus(cpus: list[int]) -> tuple[list[int], list[int]]:
    """Prefill gets the first half of the cores, decode the rest (at least one each)."""
    if len(cpus) < 2:
        raise ValueError(f"disaggregated modes need at least 2 cores, got {cpus}")
    half = len(cpus) // 2
    return cpus[:half], cpus[half:]


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def mode_config(mode: str, a: argparse.Namespace, cpus: list[int], log_dir: Path,
                dtype: str | None = None) -> ClusterConfig:
    """The deployment of one mode (see the module docstring); every node runs ``dtype``
    (None: the nodes' own default)."""
    extra = tuple(arg for item in a.node_arg for arg in item.split("=", 1)) if a.node_arg else ()
    if "--dtype" in extra:
        raise ValueError("--node-arg may not set --dtype: use --dtype (the peer runs it too)")
    if dtype is not None:
        extra = ("--dtype", dtype, *extra)
    common = dict(model=a.model, prefill_tp=a.prefill_tp, decode_tp=a.decode_tp,
                  kv_transport=a.kv_transport, node_args=extra, log_dir=str(log_dir / mode))
    if mode == "colocated":
        return ClusterConfig(num_prefill=0, policy="local", **common,
                             decode_args=("--cpus", _cpu_list(cpus)))
    if mode == "conditional":
        layout = plan_layout(cpus, a.prefill_tp, a.decode_tp)
        pre, dec = layout.cores("prefill"), layout.cores("decode")   # unpinned: all of cpus
        return ClusterConfig(num_prefill=1, policy="cost", policy_options=tuple(a.policy_option),
                             prefill_args=("--cpus", _cpu_list(pre)),
                             decode_args=("--cpus", _cpu_list(dec)),
                             compute_turns=bool(layout.shared()), **common)
    pre, dec = split_cpus(cpus)
    return ClusterConfig(num_prefill=1, policy="remote", prefill_args=("--cpus", _cpu_list(pre)),
                         decode_args=("--cpus", _cpu_list(dec)), **common)


def warm_up(target: TargetConfig, requests: list[ShapedRequest], n: int) -> None:
    """Send ``n`` requests one at a time (first calls, cost-model calibration); the
    prompts are reversed so they share no prefix with the measured ones."""
    picks = [ShapedRequest(send_at_s=0.0, prompt_token_ids=r.prompt_token_ids[::-1],
                           max_tokens=min(r.max_tokens, 16), source_index=-1)
             for r in requests[:max(n, 0)]]
    for req in picks:
        run = replay([req], target, show_progress=False)
        if run.results and run.results[0].status != "ok":
            raise RuntimeError(f"warm-up request failed: {run.results[0].error}")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _title(series: list[str]) -> str:
    text = " vs ".join(series)
    return text[:1].upper() + text[1:]


def run_experiment(a: argparse.Namespace) -> int:
    """Run every mode at every rate; write the side-by-side report."""
    modes, peer = series_plan(a, MODES)     # refuses a missing peer environment first
    if a.control is not None:
        if a.control not in modes:
            raise ValueError(f"--control {a.control!r} must be one of --modes ({a.modes!r})")
        modes = [*modes, control_name(a.control)]
    peer_model = served_model(peer.url, {}) if peer and peer.url else None
    dtype = resolve_dtype(a.dtype, "cpu")
    cpus = sorted(parse_cpus(a.cpus)) if a.cpus else usable_cpus()
    slo = slo_bounds(a)
    runs = shape_runs(a)
    out = Path(a.out)
    records: list[RunRecord] = []
    t_start = time.monotonic()
    interrupted = False
    try:
        for i, mode in enumerate(modes, 1):
            print(f"[experiment] {mode} ({i}/{len(modes)}): starting", file=sys.stderr, flush=True)
            if peer is not None and mode == peer.name:
                stopped = _run_peer(peer, peer_model, a, dtype, cpus, runs, slo, out, records)
            else:
                stopped = _run_mode(mode, a, dtype, cpus, runs, slo, out, records)
            if stopped:
                interrupted = True
                break
    except KeyboardInterrupt:       # Ctrl-C while a deployment starts or warms up
        interrupted = True
    if interrupted:
        print("interrupted: writing what was collected", file=sys.stderr)
    if not records:
        print("[experiment] nothing was measured; no report written", file=sys.stderr)
        return 130 if interrupted else 1
    meta = {"command": " ".join(["disagg", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": _git_commit(),
            "cpus": cpus, "modes": modes, "control": a.control, "model": a.model, "dtype": dtype,
            "peer": None if peer is None else {"name": peer.name, "url": peer.url,
                                               "vllm_python": peer.vllm_python
                                               and str(peer.vllm_python)},
            "trace": str(a.trace),
            "prefill_tp": a.prefill_tp, "decode_tp": a.decode_tp, "kv_transport": a.kv_transport,
            "wall_time_s": round(time.monotonic() - t_start, 1)}
    measured = list(dict.fromkeys(r.series for r in records))
    against = peer.name if peer is not None and peer.name in measured else None
    twin = control_name(a.control) if a.control and control_name(a.control) in measured else None
    write_report(out, records, meta, a.attainment_target, title=_title(measured), peer=against,
                 control=twin)
    if against is not None:
        for line in peer_lines(peer_comparison(records, a.attainment_target, against), against,
                               a.attainment_target):
            print(f"[experiment] {line[2:].replace('**', '')}", file=sys.stderr)
    if twin is not None:
        _, noise, judged = judge(records, twin)
        for line in verdict_lines(noise, judged):
            print(f"[experiment] {line}", file=sys.stderr)
    print(f"[experiment] report written to {out}/report.md", file=sys.stderr)
    return 130 if interrupted else 0


def _run_mode(series: str, a: argparse.Namespace, dtype: str, cpus: list[int], runs, slo,
              out: Path, records: list[RunRecord]) -> bool:
    """Deploy ``series``' mode (a control series: its mode again, logs under
    ``logs/control``), warm it up, replay every rate; True when interrupted."""
    mode = series_of(series)
    logs = out / "logs" / ("control" if mode != series else "")
    with LocalCluster(mode_config(mode, a, cpus, logs, dtype)) as cluster:
        cluster.start()
        target = TargetConfig(base_url=cluster.http_url, model=served_model(cluster.http_url, {}),
                              timeout_s=a.timeout_s)
        return _run_rates(series, target, a, runs, slo, records)


def _run_peer(peer: PeerConfig, model: str | None, a: argparse.Namespace, dtype: str,
              cpus: list[int], runs, slo, out: Path, records: list[RunRecord]) -> bool:
    """The peer series: start it if needed (once for every rate), warm it up, replay
    every rate; True when interrupted."""
    with running_peer(peer, a.model, dtype, cpus, out / "logs" / peer.name) as url:
        target = TargetConfig(base_url=url, model=model or served_model(url, {}),
                              timeout_s=a.timeout_s)
        return _run_rates(peer.name, target, a, runs, slo, records)


def _run_rates(series: str, target: TargetConfig, a: argparse.Namespace, runs, slo,
               records: list[RunRecord]) -> bool:
    """Warm ``target`` up, then replay every rate as ``series``; True when interrupted."""
    warm_up(target, runs[0][1], a.warmup)
    for rate, requests in runs:
        rec = run_one(requests, target, series, offered_rate(requests, rate), slo)
        records.append(rec)
        s = rec.summary
        print(f"[experiment] {series} @ {rec.rate:g} req/s: SLO attainment "
              f"{100 * (s['slo_attainment'] or 0):.0f} %, goodput {s['goodput_rps']:.2f} "
              f"req/s, errors {s['num_errors']}", file=sys.stderr, flush=True)
        if rec.run.interrupted:
            return True
    return False

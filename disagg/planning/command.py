"""``disagg plan``: recommend prefill and decode nodes for a trace, target rate and SLOs.

    disagg plan --profile node-profile.json --target-rate 0.6 --max-compute 8
    disagg plan --from-metrics http://127.0.0.1:8000 \\
        --target-rate 0.6 --max-compute 2 --units-per-rank 1,2 --tp-efficiency 0.7 --json

The trace is windowed and length-shaped as ``disagg replay`` does (the same
flags; the defaults are ``disagg experiment``'s, so a plan and an experiment
see the same requests), its arrival pattern kept (or Poisson with
``--arrivals poisson``) and rescaled to each rate tried. Node rates come from a
profile file or a running router's ``/metrics`` (see
:mod:`disagg.planning.profile`); every deployment within ``--max-compute`` is
simulated (:mod:`disagg.planning.simulate`) and searched
(:mod:`disagg.planning.search`). Output: a table on stdout, or one JSON object
with ``--json``; progress on stderr. Exit 0 with a recommendation, 1 when no
deployment reaches the target rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec
from tqdm import tqdm

from disagg.planning.profile import Profile, candidate_profile, load_profile
from disagg.planning.router_metrics import profile_from_metrics
from disagg.planning.search import SLO, Plan, PlanRow, SearchConfig, plan
from disagg.planning.simulate import Workload
from disagg.replay.commands import EXPERIMENT_SHAPING, parse_rates
from disagg.replay.shaping import ShapeConfig, select_window, send_times, shape_lengths
from disagg.replay.traces import READERS, read_trace



def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return sorted(set(values))


def _shape(text: str) -> tuple[int, int]:
    """``"2"`` → (2, 1); ``"1x2"`` → (1, 2): TP and units per rank."""
    tp, _, upr = text.partition("x")
    try:
        shape = int(tp), int(upr or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TP or TPxUNITS_PER_RANK, got {text!r}") \
            from None
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"TP and units per rank must be >= 1, got {text!r}")
    return shape


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``disagg plan``."""
    g = p.add_argument_group("node rates (one of)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", metavar="FILE",
                     help="JSON node profile (format: disagg/planning/profile.py)")
    src.add_argument("--from-metrics", metavar="URL",
                     help="a running disagg router: its calibrated cost-model estimates "
                          "and what its nodes registered with")
    g.add_argument("--metrics-prefill-shape", type=_shape, default=None, metavar="TP[xU]",
                   help="with --from-metrics: the TP (and units per rank) the prefill fit "
                        "stands for (default: what the router's prefill nodes registered "
                        "with, which must be one shape; TP 1 when none is registered)")
    g.add_argument("--metrics-decode-shape", type=_shape, default=None, metavar="TP[xU]",
                   help="with --from-metrics: the same for the decode fit")
    g.add_argument("--kv-bytes-per-token", type=float, default=None,
                   help="KV bytes of one token over all ranks (SmolLM2 float32: 46080); "
                        "overrides the profile's, or what the router's nodes registered with")
    g.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV tokens one decode node holds (its KV blocks x block size); "
                        "overrides the profile's, or the smallest the router's decode nodes "
                        "registered with; default unlimited")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="engine limit on sequences per step (default: profile's, else 64)")
    g.add_argument("--max-batched-tokens", type=int, default=None,
                   help="engine token budget per step (default: profile's, else 2048)")
    g.add_argument("--unit", default=None, help="name of a compute unit, e.g. core or GPU")
    g.add_argument("--save-profile", metavar="FILE", default=None,
                   help="also write the profile used (e.g. read from --from-metrics) as JSON")

    s = p.add_argument_group("search")
    s.add_argument("--target-rate", type=float, required=True,
                   help="mean request rate (req/s) the deployment must sustain within the SLOs")
    s.add_argument("--max-compute", type=int, required=True,
                   help="compute units (cores or GPUs) a deployment may take in all")
    s.add_argument("--tp", type=_int_list, default=None,
                   help="candidate TP degrees, e.g. 1,2,4 (default: the profile's)")
    s.add_argument("--units-per-rank", type=_int_list, default=None,
                   help="candidate units per rank, e.g. 1,2 (CPU cores per rank; default: "
                        "the profile's)")
    s.add_argument("--tp-efficiency", type=float, default=None,
                   help="assumed parallel efficiency E in (0, 1] for shapes the profile lacks: "
                        "k times the units run 1 + (k-1)E times as fast (default: refuse to "
                        "extrapolate)")
    s.add_argument("--kinds", default="colocated,disaggregated",
                   help="deployments to consider: colocated, disaggregated or both")
    s.add_argument("--rate-tolerance", type=float, default=0.01,
                   help="goodput bisection stops within this share of the rate")
    s.add_argument("--rates", default=None,
                   help="also report each deployment's simulated attainment at these "
                        "comma-separated rates (to set against `disagg experiment --rates`)")
    s.add_argument("--arrivals", choices=("trace", "poisson"), default="trace",
                   help="keep the trace's arrival pattern (default) or draw Poisson arrivals")
    s.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")

    t = p.add_argument_group("trace and shaping (as disagg replay; defaults: disagg experiment's)")
    d = EXPERIMENT_SHAPING
    t.add_argument("--trace", default=d["trace"], help="Mooncake JSONL or Azure CSV")
    t.add_argument("--format", default="auto", choices=["auto", *READERS])
    t.add_argument("--start-s", type=float, default=d["start_s"], help="window start, trace seconds")
    t.add_argument("--duration-s", type=float, default=None, help="window length, trace seconds")
    t.add_argument("--max-requests", type=int, default=d["max_requests"])
    t.add_argument("--length-scale", type=float, default=d["length_scale"])
    t.add_argument("--max-input-tokens", type=int, default=d["max_input_tokens"])
    t.add_argument("--max-output-tokens", type=int, default=d["max_output_tokens"])
    t.add_argument("--max-model-len", type=int, default=None, help="prompt + output must fit")

    o = p.add_argument_group("SLO and output")
    o.add_argument("--ttft-slo-ms", type=float, default=d["ttft_slo_ms"])
    o.add_argument("--tpot-slo-ms", type=float, default=d["tpot_slo_ms"])
    o.add_argument("--attainment-target", type=float, default=0.9,
                   help="share of requests that must meet both SLOs")
    o.add_argument("--json", action="store_true", help="print one JSON object, no table")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def workload_from_trace(a: argparse.Namespace) -> Workload:
    """The shaped trace's lengths and its arrivals at a mean rate of 1 req/s."""
    # Only lengths and times are used: no token ids are drawn, so any vocabulary does.
    cfg = ShapeConfig(vocab_size=1, min_token_id=0, start_s=a.start_s, duration_s=a.duration_s,
                      max_requests=a.max_requests, length_scale=a.length_scale,
                      max_input_tokens=a.max_input_tokens, max_output_tokens=a.max_output_tokens,
                      max_model_len=a.max_model_len, target_rate=1.0)
    chosen = select_window(read_trace(a.trace, a.format), cfg)
    if len(chosen) < 2:
        raise ValueError("the trace window selects fewer than 2 requests: no rate to scale")
    lengths = [shape_lengths(r, cfg) for r in chosen]
    if a.arrivals == "poisson":
        return Workload.poisson(lengths, a.seed)
    return Workload(tuple(send_times(chosen, cfg)), tuple(lengths))


def load_node_profile(a: argparse.Namespace) -> tuple[Profile, list[str]]:
    """The profile from ``--profile`` or ``--from-metrics``, flags applied, candidate
    shapes expanded; and warnings."""
    limits = {k: v for k, v in (("max_num_seqs", a.max_num_seqs),
                                ("max_batched_tokens", a.max_batched_tokens),
                                ("kv_bytes_per_token", a.kv_bytes_per_token),
                                ("unit", a.unit)) if v is not None}
    if a.from_metrics:
        profile, warnings = profile_from_metrics(
            a.from_metrics, prefill_shape=a.metrics_prefill_shape,
            decode_shape=a.metrics_decode_shape, kv_capacity_tokens=a.kv_capacity_tokens,
            **limits)
    else:
        profile, warnings = load_profile(a.profile), []
        if limits:
            profile = msgspec.structs.replace(profile, **limits)
            profile = msgspec.convert(msgspec.to_builtins(profile), Profile)   # re-check
        if a.kv_capacity_tokens is not None:
            profile = msgspec.structs.replace(profile, decode=tuple(
                msgspec.structs.replace(d, kv_capacity_tokens=a.kv_capacity_tokens)
                for d in profile.decode))
    if a.save_profile:
        Path(a.save_profile).write_bytes(profile.to_json())
    return candidate_profile(profile, a.tp, a.units_per_rank, a.tp_efficiency,
                             a.max_compute), warnings


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def table(result: Plan, unit: str, extra_rates: list[float]) -> str:
    """The rows as a fixed-width table; ``*`` marks the recommendation (``~``: a shape
    extrapolated with --tp-efficiency, ``>=``: goodput at the search's ceiling)."""
    head = ["", "deployment", f"{unit}s", "attain", "TTFT p90 ms", "TPOT p90 ms", "goodput"]
    head += [f"@{r:g}" for r in extra_rates]
    lines = [head]
    for row in result.rows:
        cells = ["*" if row is result.recommended else "", row.deployment.label,
                 str(row.deployment.compute), f"{100 * row.attainment:.1f}%",
                 _ms(row.ttft_p90_s), _ms(row.tpot_p90_s),
                 (">=" if row.capped else "") + f"{row.goodput_rps:.3g}"]
        cells += [f"{100 * row.attainment_at[r]:.0f}%" for r in extra_rates]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def run_plan(a: argparse.Namespace) -> int:
    """Read, search, print; 0 with a recommendation, 1 without."""
    kinds = {k.strip() for k in a.kinds.split(",") if k.strip()}
    if not kinds or kinds - {"colocated", "disaggregated"}:
        raise ValueError(f"--kinds takes colocated, disaggregated or both, got {a.kinds!r}")
    slo = SLO(None if a.ttft_slo_ms is None else a.ttft_slo_ms / 1000,
              None if a.tpot_slo_ms is None else a.tpot_slo_ms / 1000, a.attainment_target)
    cfg = SearchConfig(target_rate=a.target_rate, max_compute=a.max_compute,
                       colocated="colocated" in kinds, disaggregated="disaggregated" in kinds,
                       rate_tolerance=a.rate_tolerance)
    extra_rates = parse_rates(a.rates) or []
    profile, warnings = load_node_profile(a)
    workload = workload_from_trace(a)
    for w in warnings:
        print(f"[plan] warning: {w}", file=sys.stderr)
    tty = sys.stderr.isatty()      # a terminal: redrawn, then cleared; a log: a line per 10 s
    bar = None if a.no_progress else (lambda items: tqdm(
        items, desc="[plan] deployments", unit="dep", file=sys.stderr, leave=not tty,
        mininterval=0.5 if tty else 10.0))
    result = plan(profile, workload, slo, cfg, tuple(extra_rates), bar)
    pick = result.recommended
    if a.json:
        out = {"target_rate_rps": cfg.target_rate, "max_compute": cfg.max_compute,
               "unit": profile.unit,
               "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                       "attainment_target": slo.attainment},
               "workload": {"trace": a.trace, "requests": len(workload.lengths),
                            "arrivals": a.arrivals,
                            "mean_input_tokens": sum(i for i, _ in workload.lengths)
                            / len(workload.lengths),
                            "mean_output_tokens": sum(o for _, o in workload.lengths)
                            / len(workload.lengths)},
               "recommended": None if pick is None else pick.to_dict(),
               "configs": [r.to_dict() for r in result.rows], "warnings": warnings}
        print(json.dumps(out, indent=2))
    else:
        print(table(result, profile.unit, extra_rates))
        print(_verdict(pick, cfg, profile.unit))
    return 0 if pick is not None else 1


def _verdict(pick: PlanRow | None, cfg: SearchConfig, unit: str) -> str:
    if pick is None:
        return (f"no deployment within {cfg.max_compute} {unit}s reaches {cfg.target_rate:g} "
                "req/s within the SLOs")
    return (f"recommended: {pick.deployment.label} ({pick.deployment.compute} {unit}s), "
            f"goodput {'>= ' if pick.capped else ''}{pick.goodput_rps:.3g} req/s "
            f"for a target of {cfg.target_rate:g}")

"""The placement search: every deployment within a compute budget, its goodput, the pick.

Candidates (:func:`deployments`): every ``(num_prefill, prefill shape,
num_decode, decode shape)`` with at least one node of each role and at most
``max_compute`` units in all, plus every colocated ``(num_decode, decode
shape)`` (no prefill pool). Each is simulated at the target rate, then its
goodput — the highest mean rate whose SLO attainment is at least the target
share — is found by bisection on the rate (:func:`goodput`). The recommendation
is the deployment with the least compute whose goodput reaches the target
rate; ties go to the higher goodput, then to the first in :func:`deployments`'
order (colocated first, fewer prefill nodes first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from disagg.planning.profile import Profile
from disagg.planning.simulate import Deployment, SimResult, Workload, simulate


@dataclass(frozen=True)
class SLO:
    """Latency bounds in seconds (None = not checked) and the share of requests that
    must meet both (``attainment``, in (0, 1])."""

    ttft_s: float | None
    tpot_s: float | None
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s is None and self.tpot_s is None:
            raise ValueError("give at least one SLO bound (TTFT or TPOT)")
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {v!r}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"SLO attainment target must be in (0, 1], got {self.attainment!r}")

    def met(self, result: SimResult) -> float:
        """The share of ``result``'s requests within both bounds."""
        return result.attainment(self.ttft_s, self.tpot_s)


@dataclass(frozen=True)
class SearchConfig:
    """How far and how finely to search.

    target_rate: the mean request rate (req/s) to reach.
    max_compute: compute units a deployment may take in all.
    colocated / disaggregated: which kinds of deployment to consider.
    rate_tolerance: bisection stops when the bracket is narrower than this
        share of its lower end.
    max_factor: goodput is searched between target_rate / max_factor (below:
        reported as 0) and target_rate · max_factor (above: reported as that,
        ``capped``).
    """

    target_rate: float
    max_compute: int
    colocated: bool = True
    disaggregated: bool = True
    rate_tolerance: float = 0.01
    max_factor: float = 64.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_rate) and self.target_rate > 0):
            raise ValueError(f"target rate must be a positive number of req/s, got "
                             f"{self.target_rate!r}")
        if isinstance(self.max_compute, bool) or not isinstance(self.max_compute, int) \
                or self.max_compute < 1:
            raise ValueError(f"max compute must be an integer >= 1, got {self.max_compute!r}")
        if not (self.colocated or self.disaggregated):
            raise ValueError("consider at least one of colocated and disaggregated deployments")
        if not 0 < self.rate_tolerance < 1:
            raise ValueError(f"rate tolerance must be in (0, 1), got {self.rate_tolerance!r}")
        if not self.max_factor > 1:
            raise ValueError(f"max_factor must be > 1, got {self.max_factor!r}")


@dataclass(frozen=True)
class PlanRow:
    """One deployment's figures: at the target rate (attainment, p90 TTFT and TPOT),
    its goodput (``capped``: at least that, the search's ceiling), and its attainment
    at each extra rate asked for."""

    deployment: Deployment
    attainment: float
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    goodput_rps: float
    capped: bool
    attainment_at: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The row as JSON-ready values."""
        d = self.deployment
        return {"label": d.label, "kind": "colocated" if d.colocated else "disaggregated",
                "num_prefill": d.num_prefill, "prefill_tp": d.prefill.tp if d.prefill else None,
                "prefill_units_per_rank": d.prefill.units_per_rank if d.prefill else None,
                "num_decode": d.num_decode, "decode_tp": d.decode.tp,
                "decode_units_per_rank": d.decode.units_per_rank, "compute": d.compute,
                "extrapolated": d.decode.extrapolated or bool(d.prefill and d.prefill.extrapolated),
                "attainment": self.attainment, "ttft_p90_s": self.ttft_p90_s,
                "tpot_p90_s": self.tpot_p90_s, "goodput_rps": self.goodput_rps,
                "goodput_capped": self.capped,
                "attainment_at": {f"{r:g}": a for r, a in self.attainment_at.items()}}


@dataclass(frozen=True)
class Plan:
    """Every candidate's row (by compute, then goodput, best first) and the pick
    (None: no candidate reaches the target rate)."""

    rows: tuple[PlanRow, ...]
    recommended: PlanRow | None


def deployments(profile: Profile, cfg: SearchConfig) -> list[Deployment]:
    """Every candidate deployment within ``cfg.max_compute`` (module docstring)."""
    out = []
    if cfg.colocated:
        for dec in profile.decode:
            if dec.can_prefill:
                out += [Deployment(dec, n) for n in range(1, cfg.max_compute // dec.units + 1)]
    if cfg.disaggregated:
        for pre in profile.prefill:
            for dec in profile.decode:
                for n_p in range(1, (cfg.max_compute - dec.units) // pre.units + 1):
                    left = cfg.max_compute - n_p * pre.units
                    out += [Deployment(dec, n_d, pre, n_p)
                            for n_d in range(1, left // dec.units + 1)]
    return out


def goodput(attainment_at: Callable[[float], float], target: float, cfg: SearchConfig
            ) -> tuple[float, bool]:
    """``(rate, capped)``: the highest rate with ``attainment_at(rate) >= target``,
    by bisection from ``cfg.target_rate`` (doubling up or halving down to a bracket);
    0 below ``target_rate / max_factor``; capped at ``target_rate · max_factor``.
    Assumes attainment falls as the rate grows."""
    ok = lambda r: attainment_at(r) >= target       # noqa: E731
    lo = hi = cfg.target_rate
    if ok(lo):
        while True:
            hi = lo * 2
            if hi > cfg.target_rate * cfg.max_factor:
                return lo, True
            if not ok(hi):
                break
            lo = hi
    else:
        while True:
            lo = hi / 2
            if lo < cfg.target_rate / cfg.max_factor:
                return 0.0, False
            if ok(lo):
                break
            hi = lo
    while hi - lo > cfg.rate_tolerance * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, False


def evaluate(dep: Deployment, profile: Profile, workload: Workload, slo: SLO,
             cfg: SearchConfig, extra_rates: tuple[float, ...] = ()) -> PlanRow:
    """One deployment's row (see :class:`PlanRow`)."""
    cache: dict[float, SimResult] = {}

    def run(rate: float) -> SimResult:
        if rate not in cache:
            cache[rate] = simulate(dep, profile, workload.at_rate(rate))
        return cache[rate]

    at_target = run(cfg.target_rate)
    rate, capped = goodput(lambda r: slo.met(run(r)), slo.attainment, cfg)
    return PlanRow(dep, slo.met(at_target), at_target.p90("ttft"), at_target.p90("tpot"),
                   rate, capped, {r: slo.met(run(r)) for r in extra_rates})


def recommend(rows: list[PlanRow], target_rate: float) -> PlanRow | None:
    """The least-compute row whose goodput reaches ``target_rate`` (ties: higher
    goodput, then the earlier row); None when none does."""
    ok = [(r.deployment.compute, -r.goodput_rps, i) for i, r in enumerate(rows)
          if r.goodput_rps >= target_rate]
    return rows[min(ok)[2]] if ok else None


def plan(profile: Profile, workload: Workload, slo: SLO, cfg: SearchConfig,
         extra_rates: tuple[float, ...] = (), progress: Callable | None = None) -> Plan:
    """Evaluate every candidate and pick one. ``progress`` wraps the candidate list
    (e.g. ``tqdm``) to show how far the search is."""
    candidates = deployments(profile, cfg)
    if not candidates:
        raise ValueError(f"no deployment fits in {cfg.max_compute} units (the smallest node "
                         f"takes {min(d.units for d in profile.decode)}; colocated needs a "
                         "decode shape with a local prefill rate)")
    rows = [evaluate(d, profile, workload, slo, cfg, extra_rates)
            for d in (progress(candidates) if progress else candidates)]
    pick = recommend(rows, cfg.target_rate)
    ordered = sorted(rows, key=lambda r: (r.deployment.compute, -r.goodput_rps))
    return Plan(tuple(ordered), pick)

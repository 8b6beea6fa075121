"""What ``disagg bench serve``'s runs add up to: each client run's figures, each
server's best run per rate, the ratios between servers, best against best and
round by round, and, with a control, how far apart two identical deployments came
out and which differences exceed that (the report's ``results``, ``ratios``,
``rounds``, ``control`` and ``verdicts``; see :mod:`disagg.bench.serve`).

The pairs compared are every disagg side against vllm, ``disagg`` (the default
policy) against its own fixed modes, ``disagg-local`` and ``disagg-remote``, and a
control side (``NAME#2``: server NAME started a second time) against NAME.
"""

from __future__ import annotations

import statistics

from disagg.bench.aa_control import band, is_control, series_of, verdict

# The client's saved JSON key → ours (the names vllm/benchmarks/serve.py writes).
METRICS = {"request_throughput": "request_throughput", "output_throughput": "output_throughput",
           "median_ttft_ms": "ttft_p50_ms", "p99_ttft_ms": "ttft_p99_ms",
           "median_tpot_ms": "tpot_p50_ms", "median_itl_ms": "itl_p50_ms",
           "median_e2el_ms": "e2el_p50_ms", "completed": "completed", "failed": "failed",
           "duration": "duration_s"}
RATIO_KEYS = ("request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms",
              "tpot_p50_ms", "itl_p50_ms")
HIGHER_IS_BETTER = frozenset({"request_throughput", "output_throughput"})


def summarize(result: dict) -> dict:
    """Our metrics from one ``vllm bench serve`` saved result (its JSON keys, see METRICS)."""
    return {ours: result.get(theirs) for theirs, ours in METRICS.items()}


def best_run(runs: list[dict]) -> dict | None:
    """The run with the highest request throughput (``None`` when none completed)."""
    done = [r for r in runs if r.get("request_throughput")]
    return max(done, key=lambda r: r["request_throughput"]) if done else None


def _pairs(sides) -> list[tuple[str, str]]:
    """(side, reference) pairs compared: every disagg side against vllm, disagg
    against disagg-local and disagg-remote, and a control side against its server."""
    pairs = [(s, "vllm") for s in sides if s != "vllm" and "vllm" in sides and not is_control(s)]
    pairs += [("disagg", m) for m in ("disagg-local", "disagg-remote")
              if "disagg" in sides and m in sides]
    return pairs + [(s, series_of(s)) for s in sides if is_control(s)]


def ratios(results: dict[str, dict[str, dict | None]], rates: list[str]) -> dict:
    """Per rate, ``"side/reference"`` → side's metric / reference's for RATIO_KEYS
    (the pairs of :func:`_pairs`)."""
    out: dict[str, dict] = {}
    for rate in rates:
        row = {}
        for side, ref in _pairs(results):
            mine, theirs = results[side].get(rate), results[ref].get(rate)
            row[f"{side}/{ref}"] = {k: _ratio(mine, theirs, k) for k in RATIO_KEYS}
        out[rate] = row
    return out


def rounds(runs: dict[str, dict[str, list[dict]]], rates: list[str]) -> dict:
    """Per rate and ``"side/reference"`` pair, round by round: the request-throughput
    ratio of the two runs of each round both completed (``per_round``, in round order),
    how many of those rounds the side was at least level (``side_ahead``) and the ratio
    of the two sides' median runs. Where the best-of ratio's two runs may come from
    different rounds of a drifting machine, these say how often each side won the same
    round. Runs carry their ``round``."""
    out: dict[str, dict] = {}
    for rate in rates:
        row = {}
        for side, ref in _pairs(runs):
            done = [[r for r in runs[s][rate] if r.get("request_throughput")] for s in (side, ref)]
            both = _same_round(*done)
            mine, theirs = ([r["request_throughput"] for r in d] for d in done)
            row[f"{side}/{ref}"] = {
                "per_round": [_ratio(a, b, "request_throughput") for a, b in both],
                "side_ahead": sum(a["request_throughput"] >= b["request_throughput"]
                                  for a, b in both),
                "rounds": len(both),
                "median_ratio": (round(statistics.median(mine) / statistics.median(theirs), 3)
                                 if mine and theirs else None)}
        out[rate] = row
    return out


def control(runs: dict[str, dict[str, list[dict]]], results: dict[str, dict[str, dict | None]],
            rates: list[str], side: str) -> dict:
    """How far apart two identical deployments came out: for the control ``side``
    against its server, per metric of RATIO_KEYS, the largest relative difference
    (``band``) among their best-of ratios (every rate) and the ratios of their runs of
    the same round (every rate and round), as :func:`disagg.bench.aa_control.band`.
    ``band`` is ``None`` for a metric no ratio could be formed for. ``samples`` counts
    the ratios."""
    server = series_of(side)
    found: dict[str, list[float]] = {k: [] for k in RATIO_KEYS}
    for rate in rates:
        pairs = [(results[side].get(rate), results[server].get(rate)),
                 *_same_round(runs[side][rate], runs[server][rate])]
        for a, b in pairs:
            for key in RATIO_KEYS:
                r = _ratio(a, b, key)
                if r is not None:
                    found[key].append(r)
    return {"side": side, "of": server,
            "band": {k: band(v) for k, v in found.items()},
            "samples": len(found["request_throughput"])}


def verdicts(table: dict[str, dict[str, dict]], noise: dict) -> dict:
    """Per rate and pair of the :func:`ratios` ``table`` (the pair of the
    :func:`control` ``noise`` left out), per metric: ``"ahead"`` or ``"behind"``
    where the side's best-of ratio is better or worse than 1 by more than the
    control's band, else ``"level"`` (``None`` without a ratio or a band). Better is
    higher for the throughputs and lower for the latencies."""
    own, widths = f"{noise['side']}/{noise['of']}", noise["band"]
    return {rate: {pair: {k: verdict(figures.get(k), widths.get(k), k in HIGHER_IS_BETTER)
                          for k in RATIO_KEYS}
                   for pair, figures in row.items() if pair != own}
            for rate, row in table.items()}


def _same_round(mine: list[dict], theirs: list[dict]) -> list[tuple[dict, dict]]:
    """The pairs of runs of the same round (each run carries its ``round``), in
    round order."""
    by_round = {r["round"]: r for r in theirs}
    return sorted(((r, by_round[r["round"]]) for r in mine if r["round"] in by_round),
                  key=lambda pair: pair[0]["round"])


def _ratio(mine: dict | None, theirs: dict | None, key: str) -> float | None:
    if not mine or not theirs or not mine.get(key) or not theirs.get(key):
        return None
    return round(mine[key] / theirs[key], 3)

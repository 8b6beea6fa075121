"""What ``disagg bench serve``'s runs add up to: each client run's figures, each
server's best run per rate, and the ratios between servers, best against best and
round by round (the report's ``results``, ``ratios`` and ``rounds``; see
:mod:`disagg.bench.serve`).

The pairs compared are every disagg side against vllm, and ``disagg`` (the default
policy) against its own fixed modes, ``disagg-local`` and ``disagg-remote``.
"""

from __future__ import annotations

import statistics

# The client's saved JSON key → ours (the names vllm/benchmarks/serve.py writes).
METRICS = {"request_throughput": "request_throughput", "output_throughput": "output_throughput",
           "median_ttft_ms": "ttft_p50_ms", "p99_ttft_ms": "ttft_p99_ms",
           "median_tpot_ms": "tpot_p50_ms", "median_itl_ms": "itl_p50_ms",
           "median_e2el_ms": "e2el_p50_ms", "completed": "completed", "failed": "failed",
           "duration": "duration_s"}
RATIO_KEYS = ("request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms",
              "tpot_p50_ms", "itl_p50_ms")


def summarize(result: dict) -> dict:
    """Our metrics from one ``vllm bench serve`` saved result (its JSON keys, see METRICS)."""
    return {ours: result.get(theirs) for theirs, ours in METRICS.items()}


def best_run(runs: list[dict]) -> dict | None:
    """The run with the highest request throughput (``None`` when none completed)."""
    done = [r for r in runs if r.get("request_throughput")]
    return max(done, key=lambda r: r["request_throughput"]) if done else None


def _pairs(sides) -> list[tuple[str, str]]:
    """(side, reference) pairs compared: every disagg side against vllm, and disagg
    against disagg-local and disagg-remote."""
    pairs = [(s, "vllm") for s in sides if s != "vllm" and "vllm" in sides]
    return pairs + [("disagg", m) for m in ("disagg-local", "disagg-remote")
                    if "disagg" in sides and m in sides]


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
            mine = {r["round"]: r["request_throughput"] for r in runs[side][rate]
                    if r.get("request_throughput")}
            theirs = {r["round"]: r["request_throughput"] for r in runs[ref][rate]
                      if r.get("request_throughput")}
            both = sorted(set(mine) & set(theirs))
            per_round = [round(mine[i] / theirs[i], 3) for i in both]
            row[f"{side}/{ref}"] = {
                "per_round": per_round,
                "side_ahead": sum(mine[i] >= theirs[i] for i in both),
                "rounds": len(both),
                "median_ratio": (round(statistics.median(mine.values())
                                       / statistics.median(theirs.values()), 3)
                                 if mine and theirs else None)}
        out[rate] = row
    return out


def _ratio(mine: dict | None, theirs: dict | None, key: str) -> float | None:
    if not mine or not theirs or not mine.get(key) or not theirs.get(key):
        return None
    return round(mine[key] / theirs[key], 3)

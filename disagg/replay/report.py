"""Replay reports: per-request results, run summaries, JSONL/JSON/Markdown.

A ``RequestResult`` is what a load generator records for one request (wall
clock seconds, e.g. ``time.perf_counter()``). ``summarize`` turns a run's
results into a flat-ish dict:

- latency stats ``ttft_s``, ``tpot_s``, ``itl_s``, ``e2e_s`` (each ``{"mean",
  "p50", "p90", "p99"}`` over successful requests; ``itl_s`` pools every
  inter-token gap of every request);
- counts and throughput over ``duration_s`` (requests/s and output tokens/s
  of successful requests);
- SLO attainment: the fraction of *all* requests (errors count as misses)
  with TTFT <= the TTFT bound and TPOT <= the TPOT bound (a 1-token output
  meets TPOT trivially; a bound of ``None`` is not checked), and goodput, the
  requests/s meeting both.

Percentiles use linear interpolation between closest ranks, the same as
``numpy.percentile``'s default: for sorted values ``v[0..n-1]`` and ``q`` in
``[0, 100]``, ``rank = (n - 1) * q / 100`` and the result is
``v[floor(rank)] + (v[floor(rank) + 1] - v[floor(rank)]) * frac(rank)``.
Missing values (no data) are ``None`` so the JSON stays strict.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from disagg.replay.traces import iter_json_objects

STATUSES = ("ok", "error")
_DERIVED = ("ttft_s", "tpot_s", "e2e_s")


@dataclass
class RequestResult:
    """One replayed request's timings (seconds) and outcome.

    token_times: arrival time of each streamed chunk carrying output tokens
        (one per token when the server streams token by token).
    route: how the request was served (e.g. ``"local"``/``"remote"`` prefill),
        when the server reports it.
    text: the streamed output text (what fault runs compare with a no-fault run).
    """

    request_id: str
    send_time: float
    first_token_time: float | None
    token_times: list[float] = field(default_factory=list)
    end_time: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: str = "ok"
    error: str | None = None
    route: str | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"request {self.request_id}: status must be one of {STATUSES}, "
                             f"got {self.status!r}")
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"request {self.request_id}: token counts must be >= 0")

    @property
    def ttft(self) -> float | None:
        """Time to first token, or None when no token arrived."""
        return None if self.first_token_time is None else self.first_token_time - self.send_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: ``(end - first) / (n - 1)``;
        None for fewer than 2 output tokens."""
        if self.first_token_time is None or self.output_tokens < 2:
            return None
        return (self.end_time - self.first_token_time) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: gaps between consecutive ``token_times``."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e(self) -> float:
        """End-to-end latency, send to last byte."""
        return self.end_time - self.send_time


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear interpolation (``numpy.percentile``)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    return float(np.percentile(values, q)) if values else None


def latency_stats(values: list[float]) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` (None when empty)."""
    mean = sum(values) / len(values) if values else None
    return {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def meets_slo(result: RequestResult, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
    """Whether a request succeeded within both bounds (None = not checked)."""
    if result.status != "ok" or result.ttft is None:
        return False
    if ttft_slo_s is not None and result.ttft > ttft_slo_s:
        return False
    tpot = result.tpot
    return tpot_slo_s is None or tpot is None or tpot <= tpot_slo_s


def _check_bound(name: str, value: float | None) -> None:
    """Raise ValueError unless ``value`` is None or a finite number > 0."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                  and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def summarize(results: list[RequestResult], duration_s: float,
              ttft_slo_s: float | None = None, tpot_slo_s: float | None = None) -> dict:
    """Summarize one run; ``duration_s`` is the run's wall time (first send to
    last completion) that throughput and goodput divide by."""
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number, got {duration_s!r}")
    _check_bound("ttft_slo_s", ttft_slo_s)
    _check_bound("tpot_slo_s", tpot_slo_s)
    ok = [r for r in results if r.status == "ok"]
    met = sum(meets_slo(r, ttft_slo_s, tpot_slo_s) for r in results)
    errors = Counter((r.error or "unknown error")[:200] for r in results if r.status != "ok")
    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_errors": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput_rps": len(ok) / duration_s,
        "output_throughput_tps": sum(r.output_tokens for r in ok) / duration_s,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": sum(r.output_tokens for r in ok),
        "ttft_s": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": latency_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": latency_stats([g for r in ok for g in r.itl]),
        "e2e_s": latency_stats([r.e2e for r in ok]),
        "ttft_slo_s": ttft_slo_s,
        "tpot_slo_s": tpot_slo_s,
        "slo_met": met,
        "slo_attainment": met / len(results) if results else None,
        "goodput_rps": met / duration_s,
        "errors": dict(errors.most_common()),
        "routes": dict(Counter(r.route for r in results if r.route is not None).most_common()),
    }


def write_jsonl(results: list[RequestResult], path: str | Path) -> None:
    """Write one JSON object per result (raw fields plus derived ttft/tpot/e2e)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in results:
            obj = asdict(r)
            obj.update(ttft_s=r.ttft, tpot_s=r.tpot, e2e_s=r.e2e)
            f.write(json.dumps(obj, allow_nan=False) + "\n")


def read_jsonl(path: str | Path) -> list[RequestResult]:
    """Read results written by ``write_jsonl`` (derived fields are recomputed)."""
    known = {f.name for f in fields(RequestResult)}
    out = []
    for where, obj in iter_json_objects(path):
        unknown = set(obj) - known - set(_DERIVED)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            out.append(RequestResult(**{k: v for k, v in obj.items() if k in known}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return out


def write_summary_json(summary: dict, path: str | Path) -> None:
    """Write a summary (or a dict of summaries) as indented, strict JSON."""
    Path(path).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# (label, summary key, stat key or None, multiplier, format)
_ROWS: list[tuple[str, str, str | None, float, str]] = [
    ("requests", "num_requests", None, 1, "{:.0f}"),
    ("requests ok", "num_ok", None, 1, "{:.0f}"),
    ("errors", "num_errors", None, 1, "{:.0f}"),
    ("throughput (req/s)", "request_throughput_rps", None, 1, "{:.2f}"),
    ("output throughput (tok/s)", "output_throughput_tps", None, 1, "{:.1f}"),
    *[(f"{name} {p} (ms)", key, p, 1000, "{:.1f}")
      for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"))
      for p in ("p50", "p90", "p99")],
    *[(f"E2E {p} (s)", "e2e_s", p, 1, "{:.2f}") for p in ("p50", "p90", "p99")],
    ("SLO attainment (%)", "slo_attainment", None, 100, "{:.1f}"),
    ("goodput (req/s)", "goodput_rps", None, 1, "{:.2f}"),
    ("TTFT SLO (ms)", "ttft_slo_s", None, 1000, "{:.0f}"),
    ("TPOT SLO (ms)", "tpot_slo_s", None, 1000, "{:.0f}"),
]


def summary_figure(summary: dict, key: str, stat: str | None = None) -> float | None:
    """One figure of a :func:`summarize` result: ``summary[key]``, or with ``stat``
    (e.g. ``"p50"``) ``summary[key][stat]``; ``None`` when missing."""
    value = summary.get(key)
    if stat is not None:
        value = value.get(stat) if isinstance(value, dict) else None
    return value


def _cell(summary: dict, key: str, stat: str | None, mult: float, fmt: str) -> str:
    """Format one table cell; ``n/a`` when the value is missing."""
    value = summary_figure(summary, key, stat)
    if value is None:
        return "n/a"
    return fmt.format(value * mult)


def markdown_table(summaries: dict[str, dict]) -> str:
    """A Markdown table with one column per run (e.g. colocated, disaggregated,
    conditional) and one row per metric, units in the row label."""
    if not summaries:
        raise ValueError("markdown_table needs at least one summary")
    names = [str(n).replace("|", "\\|") for n in summaries]
    lines = ["| metric | " + " | ".join(names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for label, key, stat, mult, fmt in _ROWS:
        cells = [_cell(s, key, stat, mult, fmt) for s in summaries.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    servers = [s.get("server") or {} for s in summaries.values()]
    routes = [srv.get("routes") or s.get("routes") or {}
              for srv, s in zip(servers, summaries.values())]
    if any(routes):
        cells = [", ".join(f"{k} {v}" for k, v in r.items()) or "n/a" for r in routes]
        lines.append("| routes | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if any(servers):
        cells = [f"{srv['kv_bytes'] / 1e6:.1f}" if "kv_bytes" in srv else "n/a" for srv in servers]
        lines.append("| KV moved (MB) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

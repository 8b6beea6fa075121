"""One ``disagg bench router`` level's figures from its requests' stamped reads.

The benchmark (:mod:`disagg.bench.router`, whose docstring defines every figure)
keeps each streamed response as ``(stamp, bytes)`` reads while the level runs;
here, after the level, the SSE events are parsed (each chunk's ``disagg_timing``)
and turned into percentiles, the per-step fan-out and the target flags.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

TARGET_P50_MS = 5.0              # overhead p50 (ingress + egress), the prototype's target
ROUTER_ONLY_TARGET_P50_MS = 2.0  # router-only p50 at 32 streams, the serving-under-load target


def percentiles(values: list[float], *qs: int, unit: float = 1e3, digits: int = 3) -> dict:
    """Percentiles ``qs`` of ``values`` (seconds) as ``{"p50": ..., ...}``, in
    milliseconds rounded to 3 digits by default (``unit=1e6, digits=1``: microseconds)."""
    arr = np.asarray(values, dtype=float) * unit
    return {f"p{q}": round(float(np.percentile(arr, q)), digits) for q in qs}


def parse_stream(start: float, reads: list) -> dict:
    """A streamed completion's ingress, per-chunk egress, TTFT and token count, from
    its stamped reads."""
    out = {"ingress": None, "dispatch": None, "egress": [], "sent": [], "ttft": None, "tokens": 0}
    buf, done = b"", False
    for now, data in reads:
        buf += data
        while b"\n\n" in buf and not done:
            event, buf = buf.split(b"\n\n", 1)
            done = _on_event(event, now, start, out)
    if not done or out["ingress"] is None or not out["egress"]:
        raise RuntimeError(f"a stream ended without [DONE] or timing fields: {out}")
    return out


def _on_event(event: bytes, now: float, start: float, out: dict) -> bool:
    """Record one SSE event; True at ``[DONE]``."""
    payload = event.removeprefix(b"data: ")
    if payload == b"[DONE]":
        return True
    chunk = json.loads(payload)
    if "error" in chunk:
        raise RuntimeError(f"the stream carried an error: {chunk['error']}")
    if chunk.get("usage"):
        out["tokens"] = chunk["usage"]["completion_tokens"]
    timing = chunk.get("disagg_timing")
    if timing is None:
        return False
    if timing.get("ingress_s") is not None:      # the request's times: its first chunks
        out["ingress"] = timing["ingress_s"]
    if timing.get("dispatch_s") is not None:
        out["dispatch"] = timing["dispatch_s"]
    if timing["sent_at"] is not None:
        out["egress"].append(now - timing["sent_at"])
        out["sent"].append(timing["sent_at"])
        if out["ttft"] is None:
            out["ttft"] = now - start
    return False


def _fanout(runs: list[dict], streams: int) -> dict:
    """Per engine step (the chunks the node sent at one ``sent_at``), its first, middle
    and last stream's egress; the median of each over the steps that reached at least
    three quarters of ``streams`` (earlier and later steps of a level reach fewer)."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for r in runs:
        for egress, sent in zip(r["egress"], r["sent"]):
            by_step[sent].append(egress)
    full = [sorted(v) for v in by_step.values() if len(v) >= max(1, streams * 3 // 4)]
    if not full:
        return {"steps": 0}
    return {"steps": len(full),
            **{name: round(float(np.median([v[pick(len(v))] for v in full])) * 1e3, 3)
               for name, pick in (("first", lambda n: 0), ("median", lambda n: n // 2),
                                  ("last", lambda n: n - 1))}}


def level_figures(streams: int, raw: list, wall: float) -> dict:
    """One level's figures from its requests' starts and reads."""
    runs = [parse_stream(start, reads) for start, reads in raw]
    ingress = [r["ingress"] for r in runs]
    egress = [e for r in runs for e in r["egress"]]
    overhead = [r["ingress"] + float(np.median(r["egress"])) for r in runs]
    router_only = [r["dispatch"] + float(np.median(r["egress"])) for r in runs]
    steps = [b - a for r in runs for a, b in zip(r["sent"], r["sent"][1:])]
    row = {"concurrency": streams, "requests": len(runs),
           "tokens": sum(r["tokens"] for r in runs), "egress_samples": len(egress),
           "wall_s": round(wall, 3),
           "ingress_ms": percentiles(ingress, 50, 99),
           "egress_ms": percentiles(egress, 50, 99),
           "router_overhead_ms": percentiles(overhead, 50, 99),
           "dispatch_ms": percentiles([r["dispatch"] for r in runs], 50, 99),
           "router_only_overhead_ms": percentiles(router_only, 50, 99),
           "ttft_ms": percentiles([r["ttft"] for r in runs], 50),
           "node_step_ms": percentiles(steps or [0.0], 50),
           "step_fanout_ms": _fanout(runs, streams)}
    row["meets_target"] = row["router_overhead_ms"]["p50"] < TARGET_P50_MS
    row["router_only_meets_target"] = \
        row["router_only_overhead_ms"]["p50"] <= ROUTER_ONLY_TARGET_P50_MS
    return row

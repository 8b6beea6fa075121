"""Replay reports (disagg.replay.report): hand-computed percentiles and goodput."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from disagg.replay.report import (
    RequestResult, markdown_table, percentile, read_jsonl, summarize, write_jsonl,
    write_summary_json,
)


def _results() -> list[RequestResult]:
    """Six requests: four multi-token, one 1-token output, one error."""
    return [
        RequestResult("r1", 0.0, 0.1, [0.1, 0.2, 0.3, 0.4, 0.5], 0.5, 100, 5, route="remote"),
        RequestResult("r2", 1.0, 1.3, [1.3, 1.35, 1.4], 1.4, 50, 3, route="local"),
        RequestResult("r3", 2.0, 2.2, [2.2], 2.2, 20, 1, route="local"),
        RequestResult("r4", 3.0, 3.05, [3.05, 3.45], 3.45, 10, 2),
        RequestResult("r5", 4.0, None, [], 4.5, 30, 0, status="error", error="HTTP 503"),
        RequestResult("r6", 5.0, 5.6, [5.6, 5.7, 5.8], 5.8, 40, 3),
    ]


def test_derived_latencies():
    r1, r2, r3, r4, r5, _ = _results()
    assert (r1.ttft, r1.tpot, r1.e2e) == pytest.approx((0.1, 0.1, 0.5))
    assert r1.itl == pytest.approx([0.1] * 4)
    assert r2.tpot == pytest.approx(0.05)
    assert r3.tpot is None and r3.itl == []          # 1-token output
    assert r4.tpot == pytest.approx(0.4)
    assert r5.ttft is None and r5.tpot is None


def test_summary_percentiles_by_hand():
    s = summarize(_results(), duration_s=10.0, ttft_slo_s=0.25, tpot_slo_s=0.12)
    assert (s["num_requests"], s["num_ok"], s["num_errors"]) == (6, 5, 1)
    # TTFT of ok requests, sorted: .05 .1 .2 .3 .6
    assert s["ttft_s"]["mean"] == pytest.approx(0.25)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_s"]["p90"] == pytest.approx(0.3 + 0.6 * 0.3)    # rank 3.6
    assert s["ttft_s"]["p99"] == pytest.approx(0.3 + 0.96 * 0.3)   # rank 3.96
    # TPOT (outputs >= 2 tokens), sorted: .05 .1 .1 .4
    assert [s["tpot_s"][p] for p in ("p50", "p90", "p99")] == pytest.approx([0.1, 0.31, 0.391])
    # ITL, all gaps pooled: .05 .05 .1 .1 .1 .1 .1 .1 .4
    assert [s["itl_s"][p] for p in ("p50", "p90", "p99")] == pytest.approx([0.1, 0.16, 0.376])
    # E2E of ok requests, sorted: .2 .4 .45 .5 .8
    assert [s["e2e_s"][p] for p in ("p50", "p90", "p99")] == pytest.approx([0.45, 0.68, 0.788])


def test_throughput_slo_and_goodput_by_hand():
    s = summarize(_results(), duration_s=10.0, ttft_slo_s=0.25, tpot_slo_s=0.12)
    assert s["request_throughput_rps"] == pytest.approx(0.5)
    assert s["output_throughput_tps"] == pytest.approx(1.4)       # 5+3+1+2+3 tokens
    # met: r1 (ttft .1, tpot .1) and r3 (1 token); r2/r6 miss TTFT, r4 TPOT, r5 error
    assert s["slo_met"] == 2
    assert s["slo_attainment"] == pytest.approx(2 / 6)
    assert s["goodput_rps"] == pytest.approx(0.2)
    assert s["errors"] == {"HTTP 503": 1}
    assert s["routes"] == {"local": 2, "remote": 1}
    only_tpot = summarize(_results(), duration_s=10.0, tpot_slo_s=0.12)
    assert only_tpot["slo_met"] == 4                              # r1 r2 r3 r6


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        vals = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile q"):
        percentile([1.0], 101)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="duration_s"):
        summarize(_results(), duration_s=0.0)
    with pytest.raises(ValueError, match="ttft_slo_s"):
        summarize(_results(), duration_s=1.0, ttft_slo_s=-1.0)
    with pytest.raises(ValueError, match="status"):
        RequestResult("x", 0.0, None, status="timeout")
    empty = summarize([], duration_s=1.0)
    assert empty["slo_attainment"] is None and empty["ttft_s"]["p50"] is None


def test_jsonl_round_trip_and_errors(tmp_path):
    path = tmp_path / "raw.jsonl"
    write_jsonl(_results(), path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["ttft_s"] == pytest.approx(0.1) and first["request_id"] == "r1"
    assert read_jsonl(path) == _results()
    path.write_text(path.read_text() + '{"request_id": "x", "bogus": 1}\n')
    with pytest.raises(ValueError, match=r"raw.jsonl:7: unknown field"):
        read_jsonl(path)


def test_summary_json_and_markdown(tmp_path):
    runs = {"colocated": summarize(_results(), 10.0, 0.25, 0.12),
            "disaggregated": summarize(_results()[:2], 5.0, 0.25, 0.12)}
    write_summary_json(runs, tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == runs
    table = markdown_table(runs)
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | colocated | disaggregated |"
    assert "| TTFT p50 (ms) | 200.0 | 200.0 |" in lines
    assert "| SLO attainment (%) | 33.3 | 50.0 |" in lines
    assert "| goodput (req/s) | 0.20 | 0.20 |" in lines
    assert "| routes | local 2, remote 1 | remote 1, local 1 |" in lines
    assert all(line.count("|") == 4 for line in lines)
    with pytest.raises(ValueError):
        markdown_table({})

"""Report folders (disagg.replay.report_files): every file written, the rate sweep right."""

from __future__ import annotations

import json

import pytest

from disagg.replay.loadgen import ReplayRun
from disagg.replay.report import RequestResult, summarize
from disagg.replay.report_files import FILES, RunRecord, best_rates, sweep_table, write_report


def _record(series: str, rate: float, ttfts: list[float], with_server: bool = False) -> RunRecord:
    """A run whose requests have these TTFTs, 3 tokens each at 0.1 s per token."""
    results = [RequestResult(f"r{i}", float(i), i + t, [i + t, i + t + 0.1, i + t + 0.2],
                             i + t + 0.2, 10, 3) for i, t in enumerate(ttfts)]
    summary = summarize(results, duration_s=len(ttfts) + 1.0, ttft_slo_s=0.5, tpot_slo_s=0.2)
    if with_server:
        summary["server"] = {"routes": {"local": 1, "remote": len(ttfts) - 1},
                             "kv_bytes": 3.5e6}
    return RunRecord(series, rate, ReplayRun(results=results, duration_s=len(ttfts) + 1.0),
                     summary)


def _sweep() -> list[RunRecord]:
    return [
        _record("colocated", 0.5, [0.1] * 10),                  # 100 %
        _record("colocated", 1.0, [0.1] * 8 + [0.9] * 2),       # 80 %
        _record("conditional", 0.5, [0.2] * 10, True),          # 100 %
        _record("conditional", 1.0, [0.2] * 9 + [0.9], True),   # 90 %
        _record("remote", 0.5, [0.9] * 10),                     # 0 %
    ]


def test_best_rates_use_the_attainment_bar():
    assert best_rates(_sweep(), 0.9) == {"colocated": 0.5, "conditional": 1.0, "remote": None}
    assert best_rates(_sweep(), 0.8) == {"colocated": 1.0, "conditional": 1.0, "remote": None}


def test_sweep_table_cells_and_missing_runs():
    table = sweep_table(_sweep(), 0.9)
    lines = table.splitlines()
    assert lines[0] == "| offered rate (req/s) | colocated | conditional | remote |"
    assert lines[2].startswith("| 0.5 | ") and "(100 %)" in lines[2] and "(0 %)" in lines[2]
    assert lines[3].endswith("| n/a |")                    # remote never ran at 1.0
    assert lines[-1] == "| **highest rate with ≥ 90 % SLO** | **0.5** | **1** | none |"


def test_write_report_writes_every_file(tmp_path):
    records = _sweep()
    out = write_report(tmp_path / "rep", records, {"trace": "t.csv"}, 0.9, title="T")
    for name in FILES:
        assert (out / name).is_file(), name
    for name in ("ttft_cdf.png", "tpot_cdf.png", "goodput_vs_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rec in records:
        lines = (out / "results" / f"{rec.name}.jsonl").read_text().splitlines()
        assert len(lines) == len(rec.run.results)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"] == {"trace": "t.csv"} and summary["attainment_target"] == 0.9
    assert summary["best_rate"]["conditional"] == 1.0 and len(summary["runs"]) == 5
    md = (out / "report.md").read_text()
    assert md.startswith("# T\n") and "## Offered rate 0.5 req/s" in md
    assert "| routes | n/a | local 1, remote 9 | n/a |" in md
    assert "| KV moved (MB) | n/a | 3.5 | n/a |" in md
    assert "![goodput against rate](goodput_vs_rate.png)" in md


def test_write_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        write_report(tmp_path, [], {})

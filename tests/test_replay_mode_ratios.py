"""``disagg experiment``'s series against each other (disagg.replay.mode_ratios) and
its A/A control (``--control``): the ratios from known runs, the control's band,
the verdicts, the report's section, the refused flags, and one short run of real
deployments with a control."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from conftest import needs_smollm2
from disagg.bench.aa_control import band, control_name, gap, series_of, verdict
from disagg.replay import experiment
from disagg.replay.experiment import add_experiment_args
from disagg.replay.loadgen import ReplayRun
from disagg.replay.mode_ratios import (METRICS, control_band, mode_ratios, mode_verdicts,
                                       pairs)
from disagg.replay.report import RequestResult, summarize
from disagg.replay.report_files import RunRecord, write_report
from serving_helpers import REPO


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_experiment_args(p)
    return p.parse_args(list(argv))


def _record(series: str, rate: float, ttft: float, n_met: int, n: int = 10,
            duration_s: float = 10.0) -> RunRecord:
    """``n`` requests with TTFT ``ttft`` (3 tokens, 0.1 s apart), of which the first
    ``n_met`` meet a 0.5 s TTFT bound (the others take 1 s)."""
    results = []
    for i in range(n):
        t = ttft if i < n_met else 1.0
        results.append(RequestResult(f"r{i}", float(i), i + t, [i + t, i + t + 0.1, i + t + 0.2],
                                     i + t + 0.2, 10, 3))
    summary = summarize(results, duration_s=duration_s, ttft_slo_s=0.5, tpot_slo_s=0.2)
    return RunRecord(series, rate, ReplayRun(results=results, duration_s=duration_s), summary)


def _runs() -> list[RunRecord]:
    return [_record("colocated", 0.5, 0.20, 10), _record("colocated", 1.0, 0.20, 9),
            _record("disaggregated", 0.5, 0.40, 10), _record("disaggregated", 1.0, 0.40, 5),
            _record("conditional", 0.5, 0.21, 10), _record("conditional", 1.0, 0.19, 9),
            _record("colocated#2", 0.5, 0.22, 10), _record("colocated#2", 1.0, 0.20, 9)]


def test_aa_control_gap_band_and_verdict():
    assert gap(1.25) == pytest.approx(0.25) and gap(0.8) == pytest.approx(0.25)
    assert band([1.0, 0.9, 1.05]) == pytest.approx(0.111) and band([]) is None
    assert control_name("colocated") == "colocated#2" and series_of("colocated#2") == "colocated"
    assert verdict(1.1, 0.1, True) == "level" and verdict(1.2, 0.1, True) == "ahead"
    assert verdict(1.2, 0.1, False) == "behind" and verdict(0.8, 0.1, False) == "ahead"
    assert verdict(None, 0.1, True) is None and verdict(1.2, None, True) is None
    with pytest.raises(ValueError, match="positive"):
        gap(0.0)


def test_pairs_set_the_default_against_the_others_and_the_control_against_its_mode():
    assert pairs(["colocated", "disaggregated", "conditional", "vllm", "colocated#2"]) == [
        ("conditional", "colocated"), ("conditional", "disaggregated"), ("conditional", "vllm"),
        ("colocated#2", "colocated")]
    assert pairs(["colocated", "vllm"]) == []


def test_ratios_band_and_verdicts_from_known_runs():
    table = mode_ratios(_runs())
    assert list(table) == ["0.5", "1"]
    assert set(table["0.5"]) == {"conditional/colocated", "conditional/disaggregated",
                                 "colocated#2/colocated"}
    cc = table["1"]["conditional/colocated"]
    assert cc["goodput"] == 1.0 and cc["slo_attainment"] == 1.0
    assert cc["ttft_p50"] == pytest.approx(0.95, abs=1e-3)
    assert table["1"]["conditional/disaggregated"]["slo_attainment"] == pytest.approx(1.8)
    noise = control_band(table, "colocated#2")
    assert noise["side"] == "colocated#2" and noise["of"] == "colocated" and noise["samples"] == 2
    assert noise["band"]["ttft_p50"] == pytest.approx(0.1)     # 0.22 / 0.20 at 0.5 req/s
    assert noise["band"]["goodput"] == 0.0
    judged = mode_verdicts(table, noise)
    assert "colocated#2/colocated" not in judged["0.5"]
    assert judged["0.5"]["conditional/colocated"]["ttft_p50"] == "level"      # 1.05
    assert judged["1"]["conditional/colocated"]["ttft_p50"] == "level"        # 0.95
    assert judged["1"]["conditional/disaggregated"]["goodput"] == "ahead"     # 9 met against 5
    assert judged["0.5"]["conditional/disaggregated"]["goodput"] == "level"   # 10 against 10
    assert judged["1"]["conditional/disaggregated"]["ttft_p50"] == "ahead"    # 0.19 against 0.4
    worse = [r for r in _runs() if r.series != "conditional"] + [
        _record("conditional", 0.5, 0.30, 10), _record("conditional", 1.0, 0.19, 6)]
    judged = mode_verdicts(mode_ratios(worse), noise)
    assert judged["0.5"]["conditional/colocated"]["ttft_p50"] == "behind"     # 1.5
    assert judged["1"]["conditional/colocated"]["goodput"] == "behind"        # 6 against 9
    assert set(METRICS) == set(judged["1"]["conditional/colocated"])


def test_the_report_judges_the_default_against_the_control(tmp_path):
    out = write_report(tmp_path / "rep", _runs(), {}, 0.9, control="colocated#2")
    md = (out / "report.md").read_text()
    section = md[md.index("## Series against each other"):]
    assert "**conditional/colocated**" in section and "**colocated#2/colocated**" in section
    assert "| 1 | 1.000 (level) | 1.000 (level) |" in section
    assert "Control band (colocated#2 against colocated, 2 rates): goodput 0.0 %" in section
    summary = json.loads((out / "summary.json").read_text())
    assert summary["control"]["band"]["ttft_p50"] == pytest.approx(0.1)
    assert summary["verdicts"]["1"]["conditional/disaggregated"]["goodput"] == "ahead"
    plain = write_report(tmp_path / "plain", _runs()[:6], {}, 0.9)
    md = (plain / "report.md").read_text()
    assert "**conditional/colocated**" in md and "(level)" not in md and "Control band" not in md
    assert json.loads((plain / "summary.json").read_text())["control"] is None


def test_a_control_is_a_mode_being_run_and_refused_before_anything_starts(monkeypatch):
    started = []
    monkeypatch.setattr(experiment, "LocalCluster", lambda *a, **k: started.append(a))
    monkeypatch.setattr(experiment, "shape_runs", lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match="--control 'disaggregated' must be one of --modes"):
        experiment.run_experiment(_args("--modes", "colocated,conditional",
                                        "--control", "disaggregated"))
    with pytest.raises(SystemExit):
        _args("--control", "vllm")          # not a disagg mode: argparse refuses it
    assert started == []


@needs_smollm2
@pytest.mark.slow
def test_experiment_with_a_control_deploys_the_mode_twice(tmp_path):
    """Real deployments: colocated, conditional, then colocated again as the control;
    the report holds the control's band and the conditional series' verdicts."""
    out = tmp_path / "exp"
    r = subprocess.run(
        [sys.executable, "-m", "disagg.cli", "experiment", "--modes", "colocated,conditional",
         "--control", "colocated", "--max-requests", "3", "--rates", "1", "--warmup", "1",
         "--length-scale", "0.05", "--max-output-tokens", "4", "--ttft-slo-ms", "30000",
         "--tpot-slo-ms", "10000", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["modes"] == ["colocated", "conditional", "colocated#2"]
    assert [run["series"] for run in summary["runs"]] == ["colocated", "conditional",
                                                          "colocated#2"]
    for run in summary["runs"]:
        assert run["summary"]["num_ok"] == 3, run["summary"]
    twin = summary["runs"][2]["summary"]["server"]
    assert twin["routes"] == {"local": 3}           # the same colocated deployment, again
    noise = summary["control"]
    assert (noise["side"], noise["of"], noise["samples"]) == ("colocated#2", "colocated", 1)
    assert noise["band"]["goodput"] is not None and noise["band"]["ttft_p50"] is not None
    marks = summary["verdicts"]["1"]["conditional/colocated"]
    assert set(marks) == set(METRICS) and set(marks.values()) <= {"ahead", "level", "behind"}
    assert (out / "results" / "colocated#2@1.jsonl").is_file()
    assert (out / "logs" / "control" / "colocated").is_dir()
    assert "[experiment] control band (colocated#2 against colocated)" in r.stderr
    assert "[experiment] conditional/colocated @ 1 req/s:" in r.stderr

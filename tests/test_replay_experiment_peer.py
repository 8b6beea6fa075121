"""``disagg experiment``'s peer series (disagg.replay.peer): flags, the refusal of a
missing peer environment before anything starts, the report with a peer that has
no server counters, and one short run against a second real deployment."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import needs_smollm2
from disagg.cli import main
from disagg.replay import experiment
from disagg.replay.experiment import MODES, add_experiment_args
from disagg.replay.loadgen import ReplayRun
from disagg.replay.peer import PeerConfig, series_plan
from disagg.replay.report import RequestResult, summarize
from disagg.replay.report_files import RunRecord, peer_comparison, write_report
from serving_helpers import REPO, running_cluster


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_experiment_args(p)
    return p.parse_args(list(argv))


def test_default_modes_have_no_peer():
    assert series_plan(_args(), MODES) == (list(MODES), None)


def test_vllm_mode_uses_the_peer_environment(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    modes, peer = series_plan(_args("--modes", "vllm,colocated", "--vllm-python", str(python)),
                              MODES)
    assert modes == ["vllm", "colocated"]
    assert peer == PeerConfig(name="vllm", vllm_python=python)


def test_peer_url_implies_the_series_and_names_it():
    modes, peer = series_plan(_args("--modes", "colocated", "--peer-url", "http://h:1/"), MODES)
    assert modes == ["colocated", "peer"] and peer == PeerConfig(name="peer", url="http://h:1")
    modes, peer = series_plan(_args("--modes", "vllm,conditional", "--peer-url", "http://h:1",
                                    "--peer-name", "sglang"), MODES)
    assert modes == ["sglang", "conditional"] and peer.url == "http://h:1"


@pytest.mark.parametrize("argv, message", [
    (("--modes", "colocated,foo"), "--modes must be"),
    (("--modes", "colocated,colocated"), "--modes must be"),
    (("--modes", "colocated", "--peer-name", "x"), "--peer-name names"),
    (("--peer-url", "h:1", "--modes", "colocated"), "http(s)://"),
    (("--peer-url", "http://h:1", "--peer-name", "colocated"), "is a disagg mode"),
    (("--peer-url", "http://h:1", "--peer-name", "a/b"), "letters, digits"),
])
def test_bad_peer_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        series_plan(_args(*argv), MODES)


def test_missing_peer_environment_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(experiment, "LocalCluster", lambda *a, **k: started.append(a))
    monkeypatch.setattr(experiment, "shape_runs", lambda *a, **k: started.append(a))
    monkeypatch.setenv("DISAGG_VLLM_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    out = tmp_path / "exp"
    assert main(["experiment", "--modes", "colocated,vllm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "make peers" in err and len(err.splitlines()) == 1, err
    assert started == [] and not out.exists()


def test_nodes_get_the_experiment_dtype(tmp_path):
    cfg = experiment.mode_config("colocated", _args("--node-arg=--max-num-seqs=8"), [0, 1],
                                 tmp_path, "float32")
    assert cfg.node_args == ("--dtype", "float32", "--max-num-seqs", "8")
    with pytest.raises(ValueError, match="--node-arg may not set --dtype"):
        experiment.mode_config("colocated", _args("--node-arg=--dtype=bfloat16"), [0, 1],
                               tmp_path, "float32")


def test_started_server_is_pinned_to_the_cores(tmp_path):
    """The peer's server process (here a stdlib HTTP server with a /health file) runs
    on exactly the experiment's cores."""
    from disagg.bench.server_process import Server, free_port
    from disagg.cpus import usable_cpus
    (tmp_path / "health").write_text("ok")
    port, core = free_port(), usable_cpus()[-1]
    server = Server("http", [sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(tmp_path)], {}, port,
                    tmp_path / "server.log", cpus={core})
    try:
        server.start(30)
        assert os.sched_getaffinity(server.proc.pid) == {core}
    finally:
        server.stop()
    assert server.proc.poll() is not None


def _record(series: str, rate: float, ttfts: list[float], route: str | None) -> RunRecord:
    """A run whose requests have these TTFTs, 3 tokens each at 0.1 s per token; a
    disagg series (``route`` set) also has the router's counters, the peer none."""
    results = [RequestResult(f"r{i}", float(i), i + t, [i + t, i + t + 0.1, i + t + 0.2],
                             i + t + 0.2, 10, 3, route=route) for i, t in enumerate(ttfts)]
    summary = summarize(results, duration_s=len(ttfts) + 1.0, ttft_slo_s=0.5, tpot_slo_s=0.2)
    if route is not None:
        summary["server"] = {"routes": {route: len(ttfts)}, "statuses": {"ok": len(ttfts)},
                             "kv_bytes": 0.0 if route == "local" else 2e6, "kv_seconds": 0.0,
                             "prefix_cached_tokens": 0, "fallbacks": 0}
    return RunRecord(series, rate, ReplayRun(results=results, duration_s=len(ttfts) + 1.0),
                     summary)


def _sweep() -> list[RunRecord]:
    return [_record("colocated", 0.5, [0.1] * 10, "local"),            # 100 %
            _record("colocated", 1.0, [0.1] * 8 + [0.9] * 2, "local"),  # 80 %
            _record("conditional", 0.5, [0.2] * 10, "remote"),          # 100 %
            _record("conditional", 1.0, [0.2] * 10, "remote"),          # 100 %
            _record("vllm", 0.5, [0.1] * 10, None),                     # 100 %
            _record("vllm", 1.0, [0.9] * 10, None)]                     # 0 %


def test_peer_comparison_verdicts():
    assert peer_comparison(_sweep(), 0.9, "vllm") == {
        "colocated": {"best_rate": 0.5, "peer_best_rate": 0.5, "verdict": "equal"},
        "conditional": {"best_rate": 1.0, "peer_best_rate": 0.5, "verdict": "higher"}}
    low = [r for r in _sweep() if r.rate == 1.0]
    assert peer_comparison(low, 0.9, "vllm")["colocated"]["verdict"] == "neither"
    assert peer_comparison(low, 0.9, "vllm")["conditional"]["verdict"] == "higher"
    with pytest.raises(ValueError, match="no run of the peer"):
        peer_comparison(low, 0.9, "sglang")


def test_report_with_a_peer_without_server_counters(tmp_path):
    out = write_report(tmp_path / "rep", _sweep(), {"trace": "t.csv"}, 0.9, title="T",
                       peer="vllm")
    md = (out / "report.md").read_text()
    table = md[md.index("## Offered rate 0.5 req/s"):md.index("## Offered rate 1 req/s")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert rows["metric"] == "| metric | colocated | conditional | vllm |"
    assert rows["routes"] == "| routes | local 10 | remote 10 | n/a |"
    assert rows["KV moved (MB)"] == "| KV moved (MB) | 0.0 | 2.0 | n/a |"
    assert rows["SLO attainment (%)"].endswith("| 100.0 | 100.0 | 100.0 |")
    assert "| **highest rate with ≥ 90 % SLO** | **0.5** | **1** | **0.5** |" in md
    assert "### Against the peer (vllm)" in md
    assert "- **colocated**: 0.5 req/s vs vllm 0.5 req/s (equal to vllm)" in md
    assert "- **conditional**: 1 req/s vs vllm 0.5 req/s (higher than vllm)" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peer"] == "vllm" and summary["best_rate"]["vllm"] == 0.5
    assert summary["vs_peer"]["conditional"]["verdict"] == "higher"
    peer_runs = [r["summary"] for r in summary["runs"] if r["series"] == "vllm"]
    assert len(peer_runs) == 2 and all("server" not in s for s in peer_runs)
    for name in ("ttft_cdf.png", "goodput_vs_rate.png"):
        assert (out / name).stat().st_size > 0
    no_peer = (write_report(tmp_path / "plain", _sweep(), {}, 0.9) / "report.md").read_text()
    assert "Against the peer" not in no_peer


@pytest.fixture
def peer_cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, num_prefill=0, policy="local")


@needs_smollm2
@pytest.mark.slow
def test_experiment_against_a_peer_url(peer_cluster, tmp_path):
    """The peer series alone (``vllm`` in --modes, served by --peer-url): a second real
    deployment stands in for "any URL given"; the disagg modes' side is the unit tests'."""
    out = tmp_path / "exp"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "disagg.cli", "experiment", "--modes", "vllm",
         "--peer-url", peer_cluster.http_url, "--peer-name", "other", "--max-requests", "2",
         "--rates", "1,2", "--warmup", "1", "--length-scale", "0.05",
         "--max-output-tokens", "4", "--ttft-slo-ms", "30000", "--tpot-slo-ms", "10000",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["modes"] == ["other"]
    assert summary["meta"]["peer"]["url"] == peer_cluster.http_url
    assert [(run["series"], run["rate"]) for run in summary["runs"]] == [("other", 1.0),
                                                                         ("other", 2.0)]
    for run in summary["runs"]:
        assert run["summary"]["num_ok"] == 2, run["summary"]
        assert run["summary"]["server"]["routes"] == {"local": 2}   # the peer's own counters
    assert summary["best_rate"] == {"other": 2.0} and summary["vs_peer"] == {}
    assert (out / "results" / "other@2.jsonl").is_file()
    print(f"experiment with a peer URL: {time.monotonic() - t0:.0f} s")

"""``disagg replay`` and ``disagg experiment`` end to end on the embedded model.

A short replay (a few requests, tiny shaping) against a real ``disagg serve``
must write every report file, count every request on the server's routes, and
keep what it collected when interrupted with Ctrl-C. A two-mode experiment of
three requests checks the side-by-side report. Minutes on 2 cores, hence slow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import needs_smollm2
from disagg.replay.report import read_jsonl
from disagg.replay.report_files import FILES
from disagg.replay.shaping import ShapeConfig, shape
from disagg.replay.traces import read_trace
from serving_helpers import REPO, Serve

pytestmark = [needs_smollm2, pytest.mark.slow]

AZURE = REPO / "traces" / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = REPO / "traces" / "mooncake_conversation_trace.jsonl"
TINY = ["--length-scale", "0.05", "--max-output-tokens", "6", "--ttft-slo-ms", "20000",
        "--tpot-slo-ms", "5000"]


def disagg(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "disagg.cli", *args], cwd=REPO,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def base_url():
    serve = Serve()
    try:
        yield serve.wait_ready().group(1).removesuffix("/v1")
    finally:
        serve.proc.send_signal(signal.SIGINT)
        if serve.wait_exit(60) != 0:
            serve.kill_all()


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_replay_writes_every_report_file(base_url, tmp_path):
    out = tmp_path / "azure"
    r = disagg("replay", "--trace", str(AZURE), "--base-url", base_url, "--start-s", "600",
               "--max-requests", "4", "--rates", "1,2", "--out", str(out), *TINY, timeout=600)
    assert r.returncode == 0, r.stderr
    for name in FILES:
        assert (out / name).is_file(), name
    summary = _summary(out)
    assert [run["rate"] for run in summary["runs"]] == [1.0, 2.0]
    for seed, run in enumerate(summary["runs"]):
        s = run["summary"]
        assert s["num_requests"] == s["num_ok"] == 4 and s["num_errors"] == 0, s
        assert sum(s["server"]["routes"].values()) == 4, s["server"]
        assert s["slo_attainment"] == 1.0 and s["ttft_s"]["p50"] > 0
        # The server saw exactly the shaped lengths (token-id prompts, ignore_eos).
        want = shape(read_trace(AZURE), ShapeConfig(
            vocab_size=49152, start_s=600, max_requests=4, target_rate=run["rate"],
            length_scale=0.05, max_output_tokens=6, max_model_len=8192, seed=seed))
        got = {x.request_id: x for x in read_jsonl(out / "results" / f"replay@{run['rate']:g}.jsonl")}
        assert len(got) == 4
        for i, req in enumerate(want):
            assert got[f"r{i}"].prompt_tokens == len(req.prompt_token_ids)
            assert got[f"r{i}"].output_tokens == req.max_tokens
    assert summary["best_rate"] == {"replay": 2.0}
    assert "## Offered rate 2 req/s" in (out / "report.md").read_text()
    assert json.loads(r.stdout.strip().splitlines()[-1]).keys() == {"replay@1", "replay@2"}


def test_replay_mooncake_prefixes_reach_the_server(base_url, tmp_path):
    out = tmp_path / "mooncake"
    r = disagg("replay", "--trace", str(MOONCAKE), "--base-url", base_url, "--max-requests",
               "3", "--speedup", "10", "--length-scale", "0.02", "--max-output-tokens", "4",
               "--label", "mooncake", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    s = _summary(out)["runs"][0]["summary"]
    assert s["num_ok"] == 3 and s["output_tokens"] == 12, s   # ignore_eos: exactly 4 each


def test_ctrl_c_saves_what_was_collected(base_url, tmp_path):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "disagg.cli", "replay", "--trace", str(AZURE), "--base-url",
         base_url, "--max-requests", "12", "--rates", "0.5", "--out", str(out), *TINY],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)                     # model metadata load, then ~4 sends of 12
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    s = _summary(out)["runs"][0]["summary"]
    assert s["interrupted"] and 1 <= s["num_requests"] < 12, s
    assert s["num_requests"] + s["unsent"] + s["cancelled"] == 12
    for name in FILES:
        assert (out / name).is_file(), name


def test_experiment_side_by_side(tmp_path):
    out = tmp_path / "exp"
    r = disagg("experiment", "--modes", "colocated,conditional", "--max-requests", "3",
               "--rates", "1", "--warmup", "1", "--out", str(out), *TINY,
               "--node-arg=--kv-cache-memory=32MiB", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = _summary(out)
    assert summary["meta"]["modes"] == ["colocated", "conditional"]
    runs = {run["series"]: run["summary"] for run in summary["runs"]}
    assert runs["colocated"]["server"]["routes"] == {"local": 3}
    assert runs["colocated"]["server"]["kv_bytes"] == 0
    assert sum(runs["conditional"]["server"]["routes"].values()) == 3
    assert all(s["num_ok"] == 3 for s in runs.values())
    md = (out / "report.md").read_text()
    assert "| metric | colocated | conditional |" in md
    for name in FILES:
        assert (out / name).is_file(), name
    assert (out / "logs" / "colocated" / "decode-0.log").is_file()

"""Trace readers and trace shaping (disagg.replay.traces / .shaping)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from disagg.replay.shaping import (
    ShapeConfig, mean_rate, prompt_tokens, select_window, send_times, shape, shape_lengths,
)
from disagg.replay.traces import READERS, TraceRecord, detect_format, read_trace

MOONCAKE = (
    '{"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]}\n'
    '{"timestamp": 0, "input_length": 1200, "output_length": 5, "hash_ids": [0, 2, 3]}\n'
    "\n"
    '{"timestamp": 3000, "input_length": 1500, "output_length": 20, "hash_ids": [0, 1, 4]}\n'
    '{"timestamp": 7500, "input_length": 100, "output_length": 1, "hash_ids": [5]}'
)
AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:16:00.0000001,12,7"
)
CARRIED = Path(__file__).resolve().parents[1] / "traces"        # travels with the repo
SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_mooncake(tmp_path):
    recs = read_trace(_write(tmp_path, "t.jsonl", MOONCAKE))
    assert [r.arrival_s for r in recs] == [0.0, 0.0, 3.0, 7.5]
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert recs[2].hash_ids == (0, 1, 4) and recs[2].block_tokens == 512
    assert (recs[3].input_length, recs[3].output_length) == (100, 1)


def test_mooncake_sorted_relative_to_earliest(tmp_path):
    text = ('{"timestamp": 5000, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n'
            '{"timestamp": 2000, "input_length": 2, "output_length": 1, "hash_ids": [2]}\n')
    recs = read_trace(_write(tmp_path, "t.jsonl", text))
    assert [(r.arrival_s, r.index) for r in recs] == [(0.0, 1), (3.0, 0)]


@pytest.mark.parametrize("bad, match", [
    ("{not json}", "not valid JSON"),
    ('{"timestamp": 1, "input_length": 5}', "missing field"),
    ('{"timestamp": 1, "input_length": -5, "output_length": 1}', "input_length"),
    ('{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": 3}', "hash_ids"),
    ('{"timestamp": "soon", "input_length": 5, "output_length": 1}', "timestamp"),
])
def test_mooncake_malformed_row_names_file_and_line(tmp_path, bad, match):
    path = _write(tmp_path, "bad.jsonl", MOONCAKE.replace("\n\n", f"\n{bad}\n"))
    with pytest.raises(ValueError, match=match) as err:
        read_trace(path)
    assert "bad.jsonl:3" in str(err.value)


def test_read_azure_without_final_newline(tmp_path):
    recs = read_trace(_write(tmp_path, "t.csv", AZURE))
    assert len(recs) == 3
    assert [r.arrival_s for r in recs] == pytest.approx([0.0, 4.314579, 13.3194101], abs=1e-9)
    assert (recs[2].input_length, recs[2].output_length) == (12, 7)
    assert all(r.hash_ids == () and r.block_tokens == 0 for r in recs)


@pytest.mark.parametrize("text, match", [
    (AZURE.replace("18:15:50.9951690", "yesterday"), "t.csv:3: TIMESTAMP"),
    (AZURE.replace("396,109", "396,many"), "t.csv:3: field 'GeneratedTokens'"),
    (AZURE.replace("396,109", "396"), "t.csv:3: expected 3 columns"),
    (AZURE.replace("ContextTokens", "Prompt"), "lacks column"),
])
def test_azure_malformed(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_trace(_write(tmp_path, "t.csv", text))


def test_format_detection_and_registry(tmp_path, monkeypatch):
    assert detect_format(_write(tmp_path, "a.txt", MOONCAKE)) == "mooncake"
    assert detect_format(_write(tmp_path, "b.log", AZURE)) == "azure"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_format(_write(tmp_path, "c.txt", "hello\n"))
    with pytest.raises(ValueError, match="unknown trace format"):
        read_trace(tmp_path / "a.txt", fmt="burstgpt")
    monkeypatch.setitem(READERS, "one", lambda path: [TraceRecord(0.0, 4, 2)])
    assert read_trace(tmp_path / "c.txt", fmt="one") == [TraceRecord(0.0, 4, 2)]


def test_carried_traces_are_present():
    for name in ("AzureLLMInferenceTrace_conv.csv", "mooncake_conversation_trace.jsonl"):
        assert (CARRIED / name).is_file(), f"{name} must travel with the repo (traces/)"


@pytest.mark.parametrize("name, rows, span_s", [
    ("mooncake_conversation_trace.jsonl", 12031, 3536.999),
    ("mooncake_synthetic_trace.jsonl", 3993, 1022.025),
    ("AzureLLMInferenceTrace_conv.csv", 19366, 3501.7),
])
def test_real_traces_if_present(name, rows, span_s):
    path = CARRIED / name if (CARRIED / name).exists() else SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    recs = read_trace(path)
    assert len(recs) == rows
    assert recs[-1].arrival_s == pytest.approx(span_s, abs=0.05)


# ---------------------------------------------------------------- shaping

def _rec(i, t, inp, out=8, hashes=(), block=512):
    return TraceRecord(arrival_s=t, input_length=inp, output_length=out, hash_ids=tuple(hashes),
                       block_tokens=block if hashes else 0, index=i)


CFG = ShapeConfig(vocab_size=1000)


def test_shared_hash_ids_make_a_real_prefix():
    a = _rec(0, 0.0, 1300, hashes=[0, 7, 9])
    b = _rec(1, 0.0, 1100, hashes=[0, 7, 4])
    c = _rec(2, 0.0, 600, hashes=[7, 9])
    pa, pb, pc = (prompt_tokens(r, r.input_length, CFG) for r in (a, b, c))
    assert (len(pa), len(pb)) == (1300, 1100)
    assert pa[:1024] == pb[:1024]
    assert pa[1024:1100] != pb[1024:1100]
    assert pc == pa[512:1112]  # the same hash id is the same tokens anywhere
    assert min(pa + pb) >= CFG.min_token_id and max(pa + pb) < CFG.vocab_size


def test_length_scale_keeps_prefix_structure():
    cfg = ShapeConfig(vocab_size=1000, length_scale=0.25)
    a = _rec(0, 0.0, 1300, hashes=[0, 7, 9])
    b = _rec(1, 0.0, 1100, hashes=[0, 7, 4])
    (pa, pb) = (prompt_tokens(r, shape_lengths(r, cfg)[0], cfg) for r in (a, b))
    assert (len(pa), len(pb)) == (325, 275)
    assert pa[:256] == pb[:256] and pa[256:275] != pb[256:275]


def test_records_without_hash_ids_get_unique_tokens():
    a, b = _rec(0, 0.0, 200), _rec(1, 0.0, 200)
    assert prompt_tokens(a, 200, CFG) != prompt_tokens(b, 200, CFG)
    assert prompt_tokens(a, 200, CFG) == prompt_tokens(a, 200, CFG)
    assert prompt_tokens(a, 200, CFG) != prompt_tokens(a, 200, ShapeConfig(vocab_size=1000, seed=1))


def test_tokens_stable_across_processes():
    rec = _rec(3, 0.0, 700, hashes=[42, 99])
    code = ("import json; from disagg.replay.shaping import ShapeConfig, prompt_tokens; "
            "from disagg.replay.traces import TraceRecord; "
            "r = TraceRecord(0.0, 700, 8, (42, 99), 512, 3); "
            "print(json.dumps(prompt_tokens(r, 700, ShapeConfig(vocab_size=1000))))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=Path(__file__).resolve().parents[1]).stdout
    assert json.loads(out) == prompt_tokens(rec, 700, CFG)


TIMED = [_rec(i, t, 100) for i, t in enumerate([0.0, 1.0, 1.0, 4.0, 10.0, 11.0])]


def test_window_selects_and_rebases():
    cfg = ShapeConfig(vocab_size=1000, start_s=1.0, duration_s=9.0)
    assert [r.index for r in select_window(TIMED, cfg)] == [1, 2, 3]
    reqs = shape(TIMED, ShapeConfig(vocab_size=1000, start_s=1.0, max_requests=4))
    assert [r.source_index for r in reqs] == [1, 2, 3, 4]
    assert [r.send_at_s for r in reqs] == [0.0, 0.0, 3.0, 9.0]
    with pytest.raises(ValueError, match="selects no requests"):
        select_window(TIMED, ShapeConfig(vocab_size=1000, start_s=20.0))


def test_speedup_halves_the_gaps():
    base = send_times(TIMED, CFG)
    fast = send_times(TIMED, ShapeConfig(vocab_size=1000, speedup=2.0))
    assert base == [0.0, 1.0, 1.0, 4.0, 10.0, 11.0]
    assert fast == pytest.approx([t / 2 for t in base])


def test_target_rate_sets_the_mean_rate():
    times = send_times(TIMED, ShapeConfig(vocab_size=1000, target_rate=2.5))
    assert mean_rate(times) == pytest.approx(2.5)
    assert times[3] / times[5] == pytest.approx(4.0 / 11.0)  # shape of the gaps kept
    burst = [_rec(i, 5.0, 10) for i in range(3)]
    with pytest.raises(ValueError, match="same instant"):
        send_times(burst, ShapeConfig(vocab_size=1000, target_rate=1.0))


def test_length_clipping():
    cfg = ShapeConfig(vocab_size=1000, max_model_len=1000, max_output_tokens=300)
    assert shape_lengths(_rec(0, 0, 500, out=800), cfg) == (500, 300)
    assert shape_lengths(_rec(0, 0, 900, out=200), cfg) == (900, 100)   # output first
    assert shape_lengths(_rec(0, 0, 5000, out=50), cfg) == (999, 1)     # then input
    cfg2 = ShapeConfig(vocab_size=1000, length_scale=0.1, max_input_tokens=40)
    assert shape_lengths(_rec(0, 0, 1005, out=4), cfg2) == (40, 1)
    req = shape([_rec(0, 0, 5000, out=50, hashes=range(10))], cfg)[0]
    assert (len(req.prompt_token_ids), req.max_tokens) == (999, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(speedup=2.0, target_rate=3.0), "either speedup or target_rate"),
    (dict(vocab_size=3), "must exceed min_token_id"),
    (dict(duration_s=-1.0), "duration_s"),
    (dict(speedup=0.0), "speedup must be > 0"),
    (dict(max_model_len=1), "max_model_len"),
    (dict(max_requests=2.5), "max_requests"),
])
def test_shape_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapeConfig(**{"vocab_size": 1000, **kwargs})

"""``disagg bench engine`` and its baselines, without the real vLLM.

The driver is checked two ways: with ``_run_child`` replaced by canned runs
(alternation order, best-of-N per side, ratios, output comparison, what each
side is started with), and end to end on a tiny random-weight model, where
the real ``vllm_peer.py`` runs under this venv's Python against a stand-in
``vllm`` package (tests/ writes it to a temporary directory) that answers with
transformers' greedy outputs, one of them altered on purpose.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import disagg
from conftest import hf_greedy
from disagg.bench import engine as bench
from disagg.bench.peak_rss import PeakRssSampler, tree_rss_bytes
from disagg.cli import build_parser, main

VOCAB = 256     # the tiny models' vocabulary


def _args(*argv: str):
    return build_parser().parse_args(["bench", "engine", *argv])


def _expected_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """The brief's recipe, written out independently of the module."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, VOCAB, (batch, length), generator=g).tolist()


# ------------------------------------------------------------- pure helpers
def test_first_divergence_and_identical_count():
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert bench.first_divergence([5, 2], [1, 2]) == 0
    assert bench.first_divergence([1, 2], [1, 2, 3]) == 2       # shorter: diverges at its end
    got = bench.compare_outputs([[1, 2, 3], [4, 5, 6], [7, 8, 9]],
                                [[1, 2, 3], [4, 0, 6], [7, 8, 0]])
    assert got == {"identical_sequences": "1/3", "first_divergence": [None, 1, 2]}
    with pytest.raises(ValueError, match="compare 1 sequences with 2"):
        bench.compare_outputs([[1]], [[1], [2]])


def test_baseline_flag_parsing_and_rejection(capsys):
    assert _args().baseline == ("transformers",)
    assert _args("--baseline", "vllm").baseline == ("vllm",)
    assert _args("--baseline", "transformers,vllm").baseline == ("transformers", "vllm")
    assert _args("--baseline", "vllm, vllm").baseline == ("vllm",)
    for bad in ("sglang", "vllm,tgi", ","):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "engine", "--baseline", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--baseline" in err and "transformers, vllm" in err, err


def test_bad_numbers_are_refused_before_anything_runs(monkeypatch, tiny_llama):
    monkeypatch.setattr(bench, "_run_child", _must_not_run)
    for flags, match in ((("--batch-sizes", "1,x"), "--batch-sizes"),
                         (("--batch-sizes", "0"), "--batch-sizes"),
                         (("--repeats", "0"), "--repeats"),
                         (("--output-len", "0"), "--output-len"),
                         (("--prefill-len", "-1"), "--prefill-len"),
                         (("--vllm-gpu-memory-utilization", "1.5"), "utilization")):
        with pytest.raises(ValueError, match=match):
            bench.run_engine_bench(_args("--model", tiny_llama, *flags))


def test_command_round_trips_through_the_parser():
    a = _args("--baseline", "transformers,vllm", "--batch-sizes", "1,4", "--output-len", "16",
              "--prefill-len", "512", "--repeats", "1", "--dtype", "bfloat16", "--tp", "3",
              "--no-prefix-caching", "--vllm-gpu-memory-utilization", "0.4", "--json")
    words = bench._bench_flags(a)
    assert "--system" not in words and "--prompts-file" not in words
    back = build_parser().parse_args(["bench", "engine", *words])
    for key in ("baseline", "batch_sizes", "output_len", "prefill_len", "repeats", "dtype",
                "tensor_parallel_size", "no_prefix_caching", "vllm_gpu_memory_utilization",
                "json", "model", "prompt_len"):
        assert getattr(back, key) == getattr(a, key), key
    assert bench._bench_flags(_args()) == []     # defaults are left out


def test_vllm_peer_choices_match_the_engine_flags():
    """``vllm_peer.py`` keeps its own copies of the choice lists (the peer environment
    has no disagg to import them from); they must stay equal to the engine's."""
    from disagg.bench import vllm_peer
    from disagg.config import DTYPES, LOAD_FORMATS
    choices = {a.dest: tuple(a.choices) for a in vllm_peer.build_parser()._actions if a.choices}
    assert choices == {"dtype": DTYPES, "load_format": LOAD_FORMATS}


def test_vllm_cores_are_read_from_its_log():
    log = ("INFO 11-23 [ompmultiprocessing.py:185] OpenMP thread binding info: \n"
           "\tVLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False\n"
           "\tlocal_world_size=1, reserve_cpu_num=1\n"
           "\tlocal_rank=0, core ids=[1]\n\treserved_cpus=[0]\n")
    got = bench._vllm_cores(log)
    assert (got["threads"], got["compute_cores"], got["reserved_cores"]) == (1, [1], [0])
    missing = bench._vllm_cores("nothing here")
    assert missing["threads"] is None and "not found" in missing["threads_note"]


# ---------------------------------------------------- the vLLM environment
def _must_not_run(*_a, **_k):
    raise AssertionError("a side was started")


def test_missing_peer_env_fails_before_anything_runs(monkeypatch, capsys, tiny_llama, tmp_path):
    monkeypatch.setattr(bench, "_run_child", _must_not_run)
    missing = tmp_path / "nowhere" / "python"
    rc = main(["bench", "engine", "--model", tiny_llama, "--baseline", "transformers,vllm",
               "--vllm-python", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("disagg: error: ") and "\n" not in err, err
    assert "make peers" in err and str(missing) in err


def test_peer_python_lookup_order(monkeypatch, tmp_path):
    fake_pkg = tmp_path / "repo" / "disagg" / "__init__.py"
    monkeypatch.setattr(disagg, "__file__", str(fake_pkg))
    monkeypatch.delenv("DISAGG_VLLM_PYTHON", raising=False)
    default = tmp_path / "repo" / ".peers" / "vllm" / "bin" / "python"
    with pytest.raises(RuntimeError, match="make peers") as exc:
        bench.find_vllm_python(None)
    assert str(default) in str(exc.value)
    default.parent.mkdir(parents=True)
    default.write_text("#!/bin/sh\n")
    with pytest.raises(RuntimeError, match="make peers"):     # there but not executable
        bench.find_vllm_python(None)
    default.chmod(0o755)
    assert bench.find_vllm_python(None) == default
    other = tmp_path / "other-python"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("DISAGG_VLLM_PYTHON", str(other))
    assert bench.find_vllm_python(None) == other
    assert bench.find_vllm_python(str(default)) == default    # the flag wins


def test_vllm_needs_the_cpu(monkeypatch, tiny_llama):
    monkeypatch.setattr(bench, "_run_child", _must_not_run)
    with pytest.raises(ValueError, match="--device cpu"):
        bench.run_engine_bench(_args("--model", tiny_llama, "--baseline", "vllm",
                                     "--device", "cuda", "--vllm-python", sys.executable))


# ----------------------------------------------------- driver, canned runs
def _canned(side: str, n: int, rates: dict, prefill_rate: float, outputs: dict, rss: float,
            first_token: int = 5) -> dict:
    return {"system": side, "version": f"{side}-v", "dtype": "bfloat16", "threads": 2,
            "cpu_count": 2, "peak_rss_mb": rss,
            "runs": {b: {"seconds": 1.0, "tokens_per_s": r, "outputs": outputs[b]}
                     for b, r in rates.items()},
            "prefill": {"prompt_len": 64, "seconds": 1.0, "tokens_per_s": prefill_rate,
                        "first_token": first_token},
            "run": n}


def test_alternation_best_of_n_ratios_and_comparison(monkeypatch, tiny_llama):
    ours_out = {"1": [[1, 2, 3, 4]], "2": [[1, 2], [3, 4]]}
    theirs_out = {"1": [[1, 2, 9, 4]], "2": [[1, 2], [3, 5]]}
    script = {   # per side, per run: tokens/s by batch, prefill tokens/s, peak RSS
        "disagg": [({"1": 10.0, "2": 30.0}, 100.0, 900.0), ({"1": 20.0, "2": 25.0}, 200.0, 950.0)],
        "vllm": [({"1": 5.0, "2": 40.0}, 400.0, 3000.0), ({"1": 8.0, "2": 10.0}, 50.0, 2500.0)],
    }
    calls = []
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)

    def fake_run_child(side, cmd, env):
        calls.append((side, cmd, env))
        n = sum(c[0] == side for c in calls) - 1
        rates, prefill, rss = script[side][n]
        if side == "vllm":
            spec = json.loads(Path(cmd[cmd.index("--prompts") + 1]).read_text())
            assert spec["warmup"] == _expected_prompts(1, 16, 1234)[0]
            log = "\tlocal_rank=0, core ids=[1]\n\treserved_cpus=[0]\n"
            return _canned(side, n, rates, prefill, theirs_out, rss, first_token=6), log
        spec = json.loads(Path(cmd[cmd.index("--prompts-file") + 1]).read_text())
        assert spec["batches"] == {"1": _expected_prompts(1, 8, 1234),
                                   "2": _expected_prompts(2, 8, 1234)}
        assert spec["prefill"] == _expected_prompts(1, 64, 4321)[0]
        return _canned(side, n, rates, prefill, ours_out, rss), ""

    monkeypatch.setattr(bench, "_run_child", fake_run_child)
    out = bench.run_engine_bench(_args(
        "--model", tiny_llama, "--baseline", "vllm", "--batch-sizes", "1,2", "--prompt-len", "8",
        "--output-len", "4", "--prefill-len", "64", "--repeats", "2", "--dtype", "bfloat16",
        "--vllm-python", sys.executable, "--vllm-gpu-memory-utilization", "0.3"))

    assert [c[0] for c in calls] == ["disagg", "vllm", "disagg", "vllm"]
    assert out["run_order"] == ["disagg", "vllm", "disagg", "vllm"]
    # what each side was started with
    side, cmd, env = calls[1]
    assert cmd[0] == sys.executable and cmd[1] == str(bench.VLLM_PEER_SCRIPT)
    assert cmd[cmd.index("--model") + 1] == tiny_llama          # the resolved directory
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--output-len") + 1] == "4"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.3"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    _, cmd, _ = calls[0]
    assert cmd[:5] == [sys.executable, "-m", "disagg.cli", "bench", "engine"]
    assert cmd[cmd.index("--system") + 1] == "disagg" and "--json" in cmd

    # best of N per side and batch size, independently; ratios of the bests
    b1, b2 = out["batches"]["1"], out["batches"]["2"]
    assert b1["disagg_tokens_per_s"] == 20.0 and b1["vllm"]["tokens_per_s"] == 8.0
    assert b1["vllm"]["ratio"] == 2.5
    assert b2["disagg_tokens_per_s"] == 30.0 and b2["vllm"]["tokens_per_s"] == 40.0
    assert b2["vllm"]["ratio"] == 0.75
    assert b1["vllm"]["identical_sequences"] == "0/1" and b1["vllm"]["first_divergence"] == [2]
    assert b2["vllm"]["identical_sequences"] == "1/2"
    assert b2["vllm"]["first_divergence"] == [None, 1]
    assert out["prefill"] == {"prompt_len": 64, "disagg_tokens_per_s": 200.0,
                              "vllm": {"tokens_per_s": 400.0, "ratio": 0.5,
                                       "same_first_token": False}}
    assert out["peak_rss_mb"] == {"disagg": 950.0, "vllm": 3000.0}
    assert out["sides"]["vllm"]["threads"] == 1 and out["sides"]["vllm"]["reserved_cores"] == [0]
    assert out["sides"]["disagg"]["dtype"] == "bfloat16"
    assert "runs" not in out["sides"]["vllm"] and "outputs" not in json.dumps(out["sides"])
    assert out["command"].startswith("disagg bench engine ")
    assert "--baseline vllm" in out["command"] and "--prefill-len 64" in out["command"]
    assert "--system" not in out["command"]


def test_skip_baseline_and_dummy_weights(monkeypatch, tiny_llama):
    calls = []

    def fake_run_child(side, cmd, env):
        calls.append(side)
        return _canned(side, 0, {"1": 10.0}, 100.0, {"1": [[1]]}, 1.0), ""

    monkeypatch.setattr(bench, "_run_child", fake_run_child)
    out = bench.run_engine_bench(_args("--model", tiny_llama, "--baseline", "vllm",
                                       "--skip-baseline", "--batch-sizes", "1",
                                       "--repeats", "2"))
    assert calls == ["disagg", "disagg"] and out["baselines"] == []
    assert out["batches"]["1"] == {"disagg_tokens_per_s": 10.0}
    calls.clear()
    out = bench.run_engine_bench(_args("--model", tiny_llama, "--batch-sizes", "1",
                                       "--repeats", "1", "--load-format", "dummy"))
    assert calls == ["disagg", "transformers"]
    assert out["batches"]["1"]["transformers"] == {"tokens_per_s": 10.0, "ratio": 1.0}
    assert "same_first_token" not in out["prefill"]["transformers"]


# ------------------------------------------------------ child runs, memory
def test_child_failure_reports_the_tail_of_its_stderr():
    code = "import sys\nfor i in range(100): print('line', i, file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(RuntimeError, match="exit 3") as exc:
        bench._run_child("vllm", [sys.executable, "-c", code], dict(os.environ))
    assert "line 99" in str(exc.value) and "line 10\n" not in str(exc.value)
    with pytest.raises(RuntimeError, match="no JSON result"):
        bench._run_child("vllm", [sys.executable, "-c", "print('hello')"], dict(os.environ))


def test_peak_rss_counts_the_whole_process_tree():
    # a child that starts a grandchild holding ~300 MB, then waits for it
    grandchild = "b = b'x' * (300 << 20); import time; time.sleep(1.0)"
    child = (f"import subprocess, sys, json\n"
             f"subprocess.run([sys.executable, '-c', {grandchild!r}])\n"
             f"print(json.dumps({{'runs': {{}}}}))")
    result, _ = bench._run_child("disagg", [sys.executable, "-c", child], dict(os.environ))
    assert result["peak_rss_mb"] > 300
    assert tree_rss_bytes(os.getpid()) > 0 and tree_rss_bytes(2 ** 22 + 12345) == 0
    with pytest.raises(ValueError, match="interval_s"):
        PeakRssSampler(os.getpid(), interval_s=0)


# ------------------------------------------- end to end, stand-in vLLM package
FAKE_VLLM = '''
"""A stand-in for vLLM: answers from a JSON table, records how it was called."""
import json, os, sys, time
from types import SimpleNamespace

__version__ = "0.0.fake"
print("INFO stand-in vllm logs to stdout, as vLLM's logger does")
print("INFO OpenMP thread binding info: \\n\\tlocal_rank=0, core ids=[1]\\n\\treserved_cpus=[0]")


def TokensPrompt(prompt_token_ids):
    return {"prompt_token_ids": prompt_token_ids}


class SamplingParams:
    def __init__(self, max_tokens, temperature=1.0, ignore_eos=False):
        self.max_tokens, self.temperature, self.ignore_eos = max_tokens, temperature, ignore_eos


class LLM:
    def __init__(self, model, dtype, gpu_memory_utilization, **kw):
        self.answers = json.load(open(os.environ["FAKE_VLLM_ANSWERS"]))
        self.log = os.environ["FAKE_VLLM_LOG"]
        self._note({"init": {"model": model, "dtype": dtype, "gmu": gpu_memory_utilization,
                             "kw": kw, "kv_space": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                             "disagg_loaded": any(m.split(".")[0] == "disagg" for m in sys.modules),
                             "script": sys.argv[0]}})

    def _note(self, entry):
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\\n")

    def generate(self, prompts, params, use_tqdm=True):
        self._note({"generate": [len(prompts), params.max_tokens, params.temperature,
                                 params.ignore_eos, use_tqdm]})
        time.sleep(0.02 * params.max_tokens)      # a plausible speed, so ratios are not 0
        outs = []
        for p in prompts:
            ids = self.answers.get(",".join(map(str, p["prompt_token_ids"])), [0] * 64)
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids[:params.max_tokens])]))
        return outs
'''


def test_end_to_end_with_both_baselines(tiny_llama, tmp_path, capsys, monkeypatch):
    out_len, prefill_len = 6, 100
    batches = {b: _expected_prompts(b, 8, 1234) for b in (1, 2)}
    prefill = _expected_prompts(1, prefill_len, 4321)[0]
    answers = {}
    for prompts in batches.values():
        for p in prompts:
            answers[",".join(map(str, p))] = hf_greedy(tiny_llama, p, out_len, ignore_eos=True)
    answers[",".join(map(str, prefill))] = hf_greedy(tiny_llama, prefill, 1)
    altered = answers[",".join(map(str, batches[2][1]))]
    altered[3] = (altered[3] + 1) % VOCAB                  # the peer disagrees from index 3

    pkg = tmp_path / "fakevllm" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    wrapper = tmp_path / "peer-python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(pkg.parent))} "
                       f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_VLLM_ANSWERS", str(tmp_path / "answers.json"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("DISAGG_VLLM_PYTHON", str(wrapper))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)

    # a step budget smaller than the prefill prompt: it must still run (chunked)
    rc = main(["bench", "engine", "--model", tiny_llama, "--baseline", "transformers,vllm",
               "--batch-sizes", "1,2", "--prompt-len", "8", "--output-len", str(out_len),
               "--prefill-len", str(prefill_len), "--max-num-batched-tokens", "64",
               "--repeats", "1", "--dtype", "float32", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    err = captured.err

    marks = [err.index(f"[bench] running {s} ...") for s in ("disagg", "transformers", "vllm")]
    assert marks == sorted(marks)
    assert "stand-in vllm logs to stdout" in err         # moved off the result's stdout
    assert out["run_order"] == ["disagg", "transformers", "vllm"]

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    init = calls[0]["init"]
    assert init == {"model": tiny_llama, "dtype": "float32", "gmu": 0.5, "kw": {},
                    "kv_space": "4", "disagg_loaded": False,
                    "script": str(bench.VLLM_PEER_SCRIPT)}
    assert [c["generate"] for c in calls[1:]] == [
        [1, 4, 0.0, False, False],                            # warm-up
        [1, out_len, 0.0, True, False], [2, out_len, 0.0, True, False],
        [1, 1, 0.0, True, False]]                             # prefill

    for b in ("1", "2"):
        row = out["batches"][b]
        assert row["disagg_tokens_per_s"] > 0
        for s in ("transformers", "vllm"):
            r = row[s]
            assert r["tokens_per_s"] > 0
            assert r["ratio"] == pytest.approx(row["disagg_tokens_per_s"] / r["tokens_per_s"],
                                               rel=0.02)
    assert out["batches"]["1"]["transformers"]["identical_sequences"] == "1/1"
    assert out["batches"]["2"]["transformers"]["identical_sequences"] == "2/2"
    assert out["batches"]["1"]["vllm"]["identical_sequences"] == "1/1"
    assert out["batches"]["2"]["vllm"]["identical_sequences"] == "1/2"
    assert out["batches"]["2"]["vllm"]["first_divergence"] == [None, 3]

    p = out["prefill"]
    assert p["prompt_len"] == prefill_len and p["disagg_tokens_per_s"] > 0
    for s in ("transformers", "vllm"):
        assert p[s]["tokens_per_s"] > 0 and p[s]["same_first_token"] is True
    sides = out["sides"]
    assert sides["disagg"]["engine_config"]["max_num_batched_tokens"] == 64
    assert sides["disagg"]["threads"] >= 1 and sides["transformers"]["threads"] >= 1
    assert sides["vllm"]["version"] == "0.0.fake" and sides["vllm"]["threads"] == 1
    assert sides["vllm"]["peer_config"]["gpu_memory_utilization"] == 0.5
    assert sides["vllm"]["peer_config"]["VLLM_CPU_KVCACHE_SPACE"] == "4"
    for s in ("disagg", "transformers", "vllm"):
        assert sides[s]["dtype"] == "float32" and sides[s]["cpu_count"] == os.cpu_count()
        assert out["peak_rss_mb"][s] > 10
    assert out["command"].startswith("disagg bench engine --batch-sizes 1,2 ")
    assert "--dtype float32" in out["command"] or _args().dtype == "float32"

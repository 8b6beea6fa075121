"""``disagg bench serve``: flags and their checks, the summary and ratios on results shaped
like ``vllm bench serve``'s saved JSON, the missing-peer error, and (where ``make peers``
has run) one real run of vLLM's client against ``disagg serve``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from disagg.bench.serve import (WARMUP_REQUESTS, add_serve_bench_args, check_args,
                                client_args, rate_key, rate_seed, round_order, run_serve_bench,
                                server_command)
from disagg.bench.serve_report import (METRICS, RATIO_KEYS, best_run, control, ratios, rounds,
                                       summarize, verdicts)
from disagg.cli import build_parser, main
from tests.conftest import needs_smollm2

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".peers" / "vllm" / "bin" / "python"
PEER_CLIENT = next((ROOT / ".peers" / "vllm" / "lib").glob("python3*/site-packages/vllm/"
                                                           "benchmarks/serve.py"), None) \
    if (ROOT / ".peers" / "vllm" / "lib").is_dir() else None
needs_peer = pytest.mark.skipif(not PEER_PY.exists() or PEER_CLIENT is None,
                                reason="no vLLM peer environment (.peers/vllm): `make peers`")


def _args(*argv: str) -> argparse.Namespace:
    """Parsed flags; a ``--*-serve-args`` value is joined with ``=`` (argparse takes a
    separate value that starts with ``--`` for a flag, as it would on the command line)."""
    words = list(argv)
    for i, w in enumerate(words[:-1]):
        if w.endswith("-serve-args"):
            words[i:i + 2] = [f"{w}={words[i + 1]}", ""]
    p = argparse.ArgumentParser()
    add_serve_bench_args(p)
    return p.parse_args([w for w in words if w])


def _saved(throughput: float, ttft: float, tpot: float, failed: int = 0) -> dict:
    """A result as ``vllm bench serve --save-result`` writes it (default percentiles 99)."""
    return {"date": "20261129-060000", "backend": "vllm", "endpoint_type": "vllm",
            "num_prompts": 10, "request_rate": 2.0, "burstiness": 1.0, "max_concurrency": None,
            "duration": 10 / throughput, "completed": 10 - failed, "failed": failed,
            "total_input_tokens": 1280, "total_output_tokens": 160,
            "request_throughput": throughput, "request_goodput": None,
            "output_throughput": 16 * throughput, "total_token_throughput": 144 * throughput,
            "mean_ttft_ms": ttft, "median_ttft_ms": ttft, "std_ttft_ms": 1.0,
            "p99_ttft_ms": 2 * ttft, "mean_tpot_ms": tpot, "median_tpot_ms": tpot,
            "std_tpot_ms": 1.0, "p99_tpot_ms": 2 * tpot, "mean_itl_ms": tpot,
            "median_itl_ms": tpot, "std_itl_ms": 1.0, "p99_itl_ms": 3 * tpot,
            "mean_e2el_ms": ttft + 15 * tpot, "median_e2el_ms": ttft + 15 * tpot,
            "std_e2el_ms": 1.0, "p99_e2el_ms": 2 * (ttft + 15 * tpot)}


def test_flags_defaults_and_parsing():
    a = _args()
    assert (a.rates, a.num_prompts, a.input_len, a.output_len, a.servers, a.repeats) == \
        ((1.0, 2.0, 4.0), 60, 256, 64, ("vllm", "disagg"), 1)
    a = _args("--rates", "0.5, 2,2,inf", "--servers", "disagg-local,disagg,disagg-remote")
    assert a.rates == (0.5, 2.0, float("inf"))
    assert a.servers == ("disagg-local", "disagg", "disagg-remote")
    sub = build_parser().parse_args(["bench", "serve", "--rates", "2", "--json"])
    assert sub.rates == (2.0,) and sub.json and sub.func.__name__ == "_cmd_bench_serve"


@pytest.mark.parametrize("flag,value", [("--rates", "0"), ("--rates", "a,b"), ("--rates", ","),
                                        ("--rates", "nan"), ("--servers", "sglang"),
                                        ("--servers", "vllm,tgi")])
def test_bad_lists_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", flag, value])
    assert flag in capsys.readouterr().err


def test_rounds_rotate_the_server_order():
    servers = ["vllm", "disagg", "disagg-local"]
    orders = [round_order(servers, r) for r in range(4)]
    assert orders[:3] == [["vllm", "disagg", "disagg-local"], ["disagg", "disagg-local", "vllm"],
                          ["disagg-local", "vllm", "disagg"]]
    assert orders[3] == orders[0]
    # over as many rounds as servers, each server runs once in each position
    assert all(sorted(o[i] for o in orders[:3]) == sorted(servers) for i in range(3))


@pytest.mark.parametrize("argv,match", [
    (("--num-prompts", "0"), "--num-prompts"), (("--repeats", "0"), "--repeats"),
    (("--output-len", "-1"), "--output-len"), (("--client-timeout-s", "0"), "client-timeout"),
    (("--servers", "disagg", "--peer-url", "http://127.0.0.1:1"), "add vllm"),
    (("--peer-url", "127.0.0.1:8000"), "http"),
    (("--disagg-serve-args", "--port 9000"), "--port"),
    (("--disagg-serve-args", "--policy=local"), "disagg-local"),
    (("--vllm-serve-args", "--model x"), "--model"),
    (("--vllm-serve-args", "--dtype bfloat16"), "--dtype"),
    (("--servers", "vllm,disagg", "--control", "disagg-local"), "one of --servers"),
    (("--control", "vllm", "--peer-url", "http://127.0.0.1:1"), "drop --peer-url")])
def test_bad_flags_are_refused_before_anything_starts(argv, match):
    with pytest.raises(ValueError, match=match):
        check_args(_args(*argv))
    with pytest.raises(ValueError, match=match):      # run_serve_bench checks first
        run_serve_bench(_args(*argv, "--vllm-python", "/nonexistent/python"))


def test_server_commands_and_one_client_command_for_all():
    a = _args("--disagg-serve-args", "--max-num-seqs 8", "--vllm-serve-args", "--max-num-seqs 8")
    model = Path("/m")
    cmd, env = server_command("vllm", a, 1234, model, "M", Path("/peer/python"))
    assert cmd[:3] == ["/peer/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5"
    assert cmd[cmd.index("--served-model-name") + 1] == "M" and cmd[-2:] == ["--max-num-seqs", "8"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    for side, policy in (("disagg", None), ("disagg-local", "local"), ("disagg-remote", "remote")):
        cmd, env = server_command(side, a, 1234, model, "M", Path("/peer/python"))
        assert cmd[1:4] == ["-m", "disagg.cli", "serve"] and env == {}
        assert cmd[cmd.index("--port") + 1] == "1234" and cmd[cmd.index("--dtype") + 1] == "float32"
        assert ("--policy" in cmd) == (policy is not None)
        if policy:
            assert cmd[-2:] == ["--policy", policy]
    # a control side runs its server's very command
    assert server_command("disagg-local#2", a, 1234, model, "M", Path("/p")) == \
        server_command("disagg-local", a, 1234, model, "M", Path("/p"))
    assert server_command("vllm#2", a, 1, model, "M", Path("/p"))[0][0] == "/p"
    assert [rate_seed(a, r) for r in a.rates] == [a.seed, a.seed + 1, a.seed + 2]
    args = client_args(a, model, "M", rate_key(2.0), str(rate_seed(a, 2.0)))
    assert args[args.index("--request-rate") + 1] == "2"
    assert args[args.index("--seed") + 1] == str(a.seed + 1)   # 2 is the second rate
    assert args[args.index("--backend") + 1] == "vllm" and "--ignore-eos" in args
    assert "--base-url" not in args     # the only per-server part, added per run


def test_summary_best_run_and_ratios_on_saved_results():
    vllm_runs = [summarize(_saved(1.5, 100.0, 50.0)), summarize(_saved(1.8, 120.0, 40.0))]
    best = best_run(vllm_runs)
    assert best["request_throughput"] == 1.8 and best["ttft_p50_ms"] == 120.0
    assert set(best) == set(METRICS.values()) and best["ttft_p99_ms"] == 240.0
    assert best["completed"] == 10 and best["failed"] == 0 and best["itl_p50_ms"] == 40.0
    assert best_run([]) is None and best_run([summarize(_saved(1.0, 1, 1) | {
        "request_throughput": 0.0})]) is None
    results = {"vllm": {"2": best, "4": None},
               "disagg": {"2": summarize(_saved(2.7, 60.0, 20.0)),
                          "4": summarize(_saved(3.0, 80.0, 30.0))},
               "disagg-local": {"2": summarize(_saved(2.7, 30.0, 40.0)), "4": None}}
    r = ratios(results, ["2", "4"])
    assert set(r["2"]) == {"disagg/vllm", "disagg-local/vllm", "disagg/disagg-local"}
    d = r["2"]["disagg/vllm"]
    assert d["request_throughput"] == 1.5 and d["output_throughput"] == 1.5
    assert d["ttft_p50_ms"] == 0.5 and d["ttft_p99_ms"] == 0.5 and d["tpot_p50_ms"] == 0.5
    assert d["itl_p50_ms"] == 0.5
    assert r["2"]["disagg/disagg-local"]["ttft_p50_ms"] == 2.0
    assert all(v is None for v in r["4"]["disagg/vllm"].values())    # vllm had no run at 4
    assert ratios({"disagg": results["disagg"]}, ["2"]) == {"2": {}}


def test_rounds_compare_the_runs_of_the_same_round():
    def run(rnd, rps):
        return summarize(_saved(rps, 1.0, 1.0)) | {"round": rnd}
    runs = {"disagg": {"2": [run(0, 1.0), run(1, 0.9), run(2, 1.2)], "4": [run(0, 2.0)]},
            "disagg-local": {"2": [run(0, 0.8), run(1, 1.0), run(2, 1.2)], "4": []},
            "vllm": {"2": [run(1, 0.5)], "4": [run(0, 1.0)]}}
    r = rounds(runs, ["2", "4"])
    local = r["2"]["disagg/disagg-local"]
    assert local["per_round"] == [1.25, 0.9, 1.0]          # a tie counts as level
    assert local["side_ahead"] == 2 and local["rounds"] == 3
    assert local["median_ratio"] == 1.0                     # 1.0 / 1.0
    assert r["2"]["disagg/vllm"] == {"per_round": [1.8], "side_ahead": 1, "rounds": 1,
                                     "median_ratio": 2.0}   # rounds 0 and 2 had no vLLM run
    assert r["4"]["disagg/disagg-local"] == {"per_round": [], "side_ahead": 0, "rounds": 0,
                                             "median_ratio": None}
    assert r["4"]["disagg/vllm"]["per_round"] == [2.0]
    assert set(r["2"]) == {"disagg/vllm", "disagg-local/vllm", "disagg/disagg-local"}


def test_the_control_band_is_the_widest_gap_of_the_same_server_and_judges_the_others():
    def run(rnd, rps, ttft=100.0, tpot=50.0):
        return summarize(_saved(rps, ttft, tpot)) | {"round": rnd}
    runs = {"disagg-local": {"2": [run(0, 1.00), run(1, 1.10, ttft=90.0)]},
            "disagg-local#2": {"2": [run(0, 0.96), run(1, 1.12, ttft=99.0)]},
            "disagg": {"2": [run(0, 1.02), run(1, 1.11)]},
            "disagg-remote": {"2": [run(0, 0.90, tpot=30.0), run(1, 1.00, tpot=40.0)]}}
    results = {s: {"2": best_run(r["2"])} for s, r in runs.items()}
    c = control(runs, results, ["2"], "disagg-local#2")
    assert c["side"] == "disagg-local#2" and c["of"] == "disagg-local"
    # best-of 1.12/1.10, round 0 0.96/1.00, round 1 1.12/1.10: the widest is 1/0.96
    assert c["band"]["request_throughput"] == round(1 / 0.96 - 1, 3) == 0.042
    assert c["band"]["ttft_p50_ms"] == 0.1                  # 99/90, best-of and round 1
    assert c["band"]["tpot_p50_ms"] == 0.0 and c["samples"] == 3
    table = ratios(results, ["2"])
    assert "disagg-local#2/disagg-local" in table["2"]          # compared, but not judged
    assert "disagg-local#2/vllm" not in table["2"]
    v = verdicts(table, c)["2"]
    assert set(v) == {"disagg/disagg-local", "disagg/disagg-remote"}
    assert set(v["disagg/disagg-local"]) == set(RATIO_KEYS)
    assert v["disagg/disagg-local"]["request_throughput"] == "level"    # 1.11/1.10
    # best runs: default 1.11 req/s against remote 1.00: ahead by more than the band;
    # the default's TPOT 50 ms against remote's 40: behind (higher latency) beyond 0.0
    assert v["disagg/disagg-remote"]["request_throughput"] == "ahead"
    assert v["disagg/disagg-remote"]["tpot_p50_ms"] == "behind"
    assert v["disagg/disagg-remote"]["ttft_p50_ms"] == "level"          # both 100 ms
    no_band = c | {"band": {k: None for k in RATIO_KEYS}}
    assert verdicts(table, no_band)["2"]["disagg/disagg-local"] == {k: None for k in RATIO_KEYS}
    lone = control({"disagg#2": {"2": []}, "disagg": {"2": []}},
                   {"disagg#2": {"2": None}, "disagg": {"2": None}}, ["2"], "disagg#2")
    assert lone["band"]["request_throughput"] is None and lone["samples"] == 0


@needs_peer
def test_metric_names_are_the_ones_vllms_client_writes():
    """Our METRICS keys against the real client source: plain keys literally, the
    percentile ones from its ``f"median_{name}_ms"`` / ``f"p{p_word}_{name}_ms"``."""
    source = PEER_CLIENT.read_text()
    assert 'result[f"median_{metric_attribute_name}_ms"]' in source
    assert 'result[f"p{p_word}_{metric_attribute_name}_ms"]' in source
    for key in METRICS:
        if not key.startswith(("median_", "p99_")):
            assert f'"{key}":' in source, key


def test_missing_peer_env_is_one_line_naming_make_peers(tmp_path, capsys):
    rc = main(["bench", "serve", "--rates", "2", "--vllm-python", str(tmp_path / "no" / "python")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "make peers" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@needs_smollm2
@needs_peer
def test_vllm_client_against_disagg_serve_end_to_end(tmp_path, capsys):
    """The real client against the real ``disagg serve``, in its default and local modes."""
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--servers", "disagg,disagg-local", "--rates", "4",
               "--control", "disagg-local",
               "--num-prompts", "4", "--input-len", "32", "--output-len", "4",
               "--disagg-serve-args=--kv-cache-memory 64MiB --router-workers 2",
               "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report == json.loads(out.read_text()) and report["ok"], report
    assert report["run_order"] == ["disagg", "disagg-local", "disagg-local#2"]
    assert report["rates"] == ["4"] and "--control disagg-local" in report["command"]
    assert report["client"]["seeds"] == {"4": 0} and "--seed '<seed>'" in report["client"]["args"]
    for side in ("disagg", "disagg-local", "disagg-local#2"):
        got = report["results"][side]["4"]
        assert got["completed"] == 4 and got["failed"] == 0, got
        assert got["request_throughput"] > 0 and got["ttft_p50_ms"] > 0 and got["itl_p50_ms"] > 0
        assert "--policy local" in report["servers"]["disagg-local"]["command"]
        assert "--policy local" in report["servers"]["disagg-local#2"]["command"]
        # the routers' own count of what they served during the run (the shared port's
        # /metrics counts both workers): the 4 prompts and the client's warm-up requests
        assert sum(got["server"]["routes"].values()) == 4 + WARMUP_REQUESTS, got["server"]
    assert set(report["results"]["disagg-local"]["4"]["server"]["routes"]) == {"local"}
    assert report["ratios"]["4"]["disagg/disagg-local"]["request_throughput"] > 0
    band = report["control"]["band"]["request_throughput"]
    assert report["control"]["samples"] == 2 and band >= 0       # best-of and round 0
    assert report["verdicts"]["4"]["disagg/disagg-local"]["request_throughput"] in \
        ("ahead", "level", "behind")
    assert report["rounds"]["4"]["disagg/disagg-local"]["rounds"] == 1
    assert report["results"]["disagg"]["4"]["round"] == 0
    runs = Path(report["runs_dir"])
    assert (runs / "disagg-rate4-r0.json").exists() and (runs / "disagg-r0-server.log").exists()

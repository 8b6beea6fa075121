"""``disagg bench router`` end to end on the embedded model: report shape and sane values."""

from __future__ import annotations

import argparse
import math

import pytest

from disagg.bench.router import add_router_bench_args, run_router_bench
from disagg.bench.router_figures import ROUTER_ONLY_TARGET_P50_MS, TARGET_P50_MS
from disagg.cli import build_parser
from tests.conftest import needs_smollm2


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_router_bench_args(p)
    return p.parse_args(list(argv))


def test_flags_and_their_checks():
    a = _args()
    assert (a.model, a.kv_cache_memory, a.concurrency, a.max_tokens) == \
        ("default", "64MiB", "1,32", 16)
    assert a.client == "stamped" and _args("--client", "httpx").client == "httpx"
    assert a.uplinks == "on" and _args("--uplinks", "off").uplinks == "off"
    with pytest.raises(SystemExit):
        _args("--client", "aiohttp")
    sub = build_parser().parse_args(["bench", "router", "--concurrency", "2", "--json"])
    assert sub.concurrency == "2" and sub.json and sub.func.__name__ == "_cmd_bench_router"
    for bad, match in ((("--concurrency", "0"), "--concurrency"),
                       (("--concurrency", "a,b"), "--concurrency"),
                       (("--requests", "0"), "--requests"), (("--warmup", "-1"), "--warmup")):
        with pytest.raises(ValueError, match=match):      # refused before any process starts
            run_router_bench(_args(*bad))


def _finite_positive(d: dict, keys: tuple[str, ...]) -> None:
    assert set(d) >= set(keys), d
    for k in keys:
        assert math.isfinite(d[k]) and d[k] > 0, (k, d)


@needs_smollm2
def test_tiny_run_reports_every_level():
    # without uplinks: the tokens come on the node's control socket, a path every other
    # serving test (uplinks by default) leaves out
    out = run_router_bench(_args("--concurrency", "1,4", "--requests", "2", "--max-tokens", "4",
                                 "--warmup", "1", "--health-probes", "10", "--uplinks", "off"))
    assert out["uplinks"] is False and "--uplinks off" in out["command"]
    assert out["policy"] == "local" and "decode node" in out["path"]
    assert out["router_only_target_p50_ms"] == ROUTER_ONLY_TARGET_P50_MS
    assert out["target_p50_ms"] == TARGET_P50_MS and out["device"].startswith("cpu, ")
    assert out["command"].startswith("disagg bench router ")
    assert "--concurrency 1,4" in out["command"] and "--client stamped" in out["command"]
    assert out["client"] == "stamped"
    _finite_positive(out["http_baseline"]["health_rtt_ms"], ("p50", "p99"))
    hop = out["loopback_hop_us"]
    assert hop["probes"] == 10 and 0 < hop["p50"] <= hop["p99"] < 1e6   # microseconds
    assert set(out["results"]) == {"1", "4"}
    for level, row in out["results"].items():
        assert row["concurrency"] == int(level)
        assert row["requests"] == 2 * int(level) and row["tokens"] == 4 * row["requests"]
        assert row["egress_samples"] >= row["requests"]      # at least one token chunk each
        for key in ("ingress_ms", "egress_ms", "router_overhead_ms"):
            _finite_positive(row[key], ("p50", "p99"))
            assert row[key]["p50"] <= row[key]["p99"]
        _finite_positive(row["ttft_ms"], ("p50",))
        _finite_positive(row["node_step_ms"], ("p50",))
        fan = row["step_fanout_ms"]     # one stream: every step counts
        assert fan["steps"] >= 1 if level == "1" else fan["steps"] >= 0
        if fan["steps"]:
            assert 0 < fan["first"] <= fan["median"] <= fan["last"] < 1000, fan
        _finite_positive(row, ("wall_s", "egress_router_side_ms_mean"))
        # CPU clocks tick every 10 ms, so a tiny level may read 0; never seconds per token
        for key in ("router_cpu_us_per_token", "client_cpu_us_per_token"):
            assert 0 <= row[key] < 1e6, (key, row[key])
        # milliseconds of one clock: seconds or a mixed-up clock would be orders larger
        assert row["egress_ms"]["p50"] < 1000 and row["router_overhead_ms"]["p99"] < 30_000
        if level == "1":                 # an idle node reads a request at once
            assert row["ingress_ms"]["p50"] < 1000
        assert row["meets_target"] == (row["router_overhead_ms"]["p50"] < TARGET_P50_MS)
        assert row["router_only_meets_target"] == \
            (row["router_only_overhead_ms"]["p50"] <= ROUTER_ONLY_TARGET_P50_MS)

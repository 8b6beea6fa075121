"""disagg plan: the simulation against hand-computed timings, the search's pick on
workloads whose answer is known, profile checks and scaling, a router's /metrics read
over HTTP, and the command in a subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import uvicorn

from disagg.cli import main
from disagg.control import messages as m
from disagg.planning.profile import (DecodeRates, PrefillRates, Profile, candidate_profile,
                                     load_profile)
from disagg.planning.router_metrics import FITS, profile_from_metrics
from disagg.sampling_params import SamplingParams
from disagg.planning.search import SLO, SearchConfig, plan
from disagg.planning.simulate import Deployment, SimRequest, Workload, simulate
from router.inflight import Inflight

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-9

# Hand-checkable figures: a 100-token prompt takes exactly 0.1 s on a prefill node
# (1000 tokens/s, no overhead, one prompt per step), a decode step 10 ms whatever the
# batch; a decode node prefills at only 100 tokens/s (1 s per prompt).
PRE = PrefillRates(tp=1, tokens_per_s=1000.0)
DEC = DecodeRates(tp=1, step_base_s=0.01, step_per_seq_s=0.0, prefill_tokens_per_s=100.0)


def profile(**fields) -> Profile:
    base = dict(prefill=(PRE,), decode=(DEC,), kv_bytes_per_token=1.0, link_bytes_per_s=1e12,
                max_num_seqs=50, max_batched_tokens=100)
    return Profile(**{**base, **fields})


def test_simulated_timings_match_the_hand_computed_ones():
    """Requests 1 s apart never meet: remote TTFT = prefill + router hops, TPOT counts
    the KV transfer before the second token; colocated TTFT = one prompt step."""
    prof = profile(remote_overhead_s=0.005, link_latency_s=0.02)
    reqs = Workload.constant(5, 100, 11).at_rate(1.0)
    disagg = simulate(Deployment(DEC, 1, PRE, 1), prof, reqs)
    # first token 0.1 + 0.005; KV at 0.12; tokens 2..11 at 0.13 .. 0.22
    assert disagg.ttft_s == pytest.approx((0.105,) * 5)
    assert disagg.tpot_s == pytest.approx(((0.22 - 0.105) / 10,) * 5)
    fast_local = msgspec.structs.replace(DEC, prefill_tokens_per_s=1000.0)
    coloc = simulate(Deployment(fast_local, 1), prof, reqs)
    assert coloc.ttft_s == pytest.approx((0.1,) * 5)
    assert coloc.tpot_s == pytest.approx((0.01,) * 5)
    # a one-token request finishes at its first token and has no TPOT
    one = simulate(Deployment(DEC, 1, PRE, 1), prof, [SimRequest(0.0, 100, 1)])
    assert one.ttft_s == pytest.approx((0.105,)) and one.tpot_s == (None,)


def test_kv_capacity_and_batch_limits_queue_requests():
    """A decode node holding one request's KV at a time serves them one after another;
    a request bigger than the whole KV is never served."""
    dec = msgspec.structs.replace(DEC, kv_capacity_tokens=111)    # exactly one 100 + 11
    reqs = [SimRequest(0.0, 100, 11), SimRequest(0.0, 100, 11), SimRequest(0.0, 200, 11)]
    res = simulate(Deployment(dec, 1, PRE, 2), profile(), reqs)
    # both prefilled at 0.1 s on two prefill nodes; the first decodes 0.1 .. 0.2, the
    # second waits for its room and decodes 0.2 .. 0.3
    assert res.tpot_s[0] == pytest.approx(0.01)
    assert res.tpot_s[1] == pytest.approx((0.3 - 0.1) / 10)
    assert res.ttft_s[2] is None and res.attainment(None, 1.0) == pytest.approx(2 / 3)


def test_planner_picks_the_hand_computed_node_counts():
    """25 req/s of 100-token prompts, 0.1 s each: a prefill node saturates at 10 req/s,
    so 3 prefill nodes are needed (2 queue without bound) and 1 decode node keeps up;
    colocated prefill takes 1 s > the 250 ms TTFT bound. Goodput: 3 nodes hold up to
    30 req/s plus the queueing the 90 % target tolerates over 200 requests."""
    slo = SLO(ttft_s=0.25, tpot_s=0.05, attainment=0.9)
    result = plan(profile(), Workload.constant(200, 100, 11), slo,
                  SearchConfig(target_rate=25.0, max_compute=6))
    pick = result.recommended.deployment
    assert (pick.num_prefill, pick.num_decode, pick.compute) == (3, 1, 4)
    rows = {r.deployment.label: r for r in result.rows}
    # k-th request on a node: TTFT = 0.1 + k (0.1 - n / rate); 90 % of them within 0.25 s
    assert 30.0 <= rows["3P tp1 + 1D tp1"].goodput_rps <= 3 / (0.1 - 0.15 / 59)
    assert 20.0 <= rows["2P tp1 + 1D tp1"].goodput_rps <= 2 / (0.1 - 0.15 / 89)
    assert rows["2P tp1 + 1D tp1"].attainment < 0.1
    assert all(r.goodput_rps == 0 for r in result.rows if r.deployment.colocated)
    assert [r.deployment.compute for r in result.rows] == \
        sorted(r.deployment.compute for r in result.rows)


@pytest.mark.parametrize("margin, met", [(EPS, True), (-EPS, False)])
@pytest.mark.parametrize("bound", ["ttft", "tpot"])
def test_slo_just_met_and_just_missed(bound, margin, met):
    """At 1 req/s TTFT is 0.105 s and TPOT 0.0115 s for every request: a bound a
    nanosecond above makes 1P + 1D the pick, a nanosecond below leaves none."""
    prof = profile(remote_overhead_s=0.005, link_latency_s=0.02)
    ttft, tpot = 0.105, (0.22 - 0.105) / 10
    slo = SLO(ttft + (margin if bound == "ttft" else 1.0),
              tpot + (margin if bound == "tpot" else 1.0), attainment=1.0)
    result = plan(prof, Workload.constant(5, 100, 11), slo,
                  SearchConfig(target_rate=1.0, max_compute=2, colocated=False))
    if met:
        assert result.recommended.deployment.label == "1P tp1 + 1D tp1"
        assert result.recommended.attainment == 1.0
    else:
        assert result.recommended is None and result.rows[0].attainment == 0.0


def test_colocated_wins_when_prefill_is_cheap_and_transfer_dear():
    """Prefill at 10,000 tokens/s everywhere, but 100 tokens of KV take 1 s to move:
    every disaggregated request's second token waits 1 s (TPOT 0.11 s > 0.05 s), so one
    colocated node is the pick."""
    cheap = msgspec.structs.replace(DEC, prefill_tokens_per_s=10_000.0)
    prof = profile(prefill=(msgspec.structs.replace(PRE, tokens_per_s=10_000.0),),
                   decode=(cheap,), kv_bytes_per_token=1e6, link_bytes_per_s=1e8)
    result = plan(prof, Workload.constant(50, 100, 11), SLO(0.25, 0.05),
                  SearchConfig(target_rate=2.0, max_compute=3))
    assert result.recommended.deployment.label == "colocated 1D tp1"
    disagg = [r for r in result.rows if not r.deployment.colocated]
    assert disagg and all(r.attainment == 0 and r.tpot_p90_s > 0.1 for r in disagg)


def test_shapes_are_extrapolated_only_with_an_explicit_efficiency():
    prof = profile()
    with pytest.raises(ValueError, match="tp2.*--tp-efficiency"):
        candidate_profile(prof, tps=[1, 2])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        candidate_profile(prof, tps=[2], efficiency=1.5)
    dec = msgspec.structs.replace(DEC, kv_capacity_tokens=1000)
    out = candidate_profile(profile(decode=(dec,)), tps=[1, 2], units_per_rank=[1, 2],
                            efficiency=0.5)
    pre = {p.shape: p for p in out.prefill}
    assert pre[(1, 1)] == PRE                                 # measured: as it is
    assert pre[(2, 1)].tokens_per_s == pytest.approx(1500)    # k = 2: 1 + 0.5
    assert pre[(2, 2)].tokens_per_s == pytest.approx(2500)    # k = 4: 1 + 3 * 0.5
    assert pre[(2, 2)].extrapolated and pre[(2, 2)].units == 4
    d = {x.shape: x for x in out.decode}
    assert d[(2, 1)].step_base_s == pytest.approx(0.01 / 1.5)
    assert d[(2, 1)].kv_capacity_tokens == 2000               # two ranks, two KV memories
    assert d[(1, 2)].kv_capacity_tokens == 1000               # more cores, same memory
    # a decode shape without a local prefill rate borrows the prefill shape's
    borrowed = candidate_profile(profile(decode=(msgspec.structs.replace(
        DEC, prefill_tokens_per_s=None),)))
    assert borrowed.decode[0].prefill_tokens_per_s == 1000.0


def test_shapes_no_deployment_can_afford_are_not_asked_for():
    """2 units in all: a 2-unit prefill node leaves none for a decode node, so a
    profile without that shape still plans (colocated on 2 units needs the 2-unit decode)."""
    two = DecodeRates(tp=1, units_per_rank=2, step_base_s=0.005, step_per_seq_s=0.0,
                      prefill_tokens_per_s=200.0)
    prof = profile(decode=(DEC, two))
    with pytest.raises(ValueError, match="prefill shapes tp1x2"):
        candidate_profile(prof, tps=[1], units_per_rank=[1, 2])
    out = candidate_profile(prof, tps=[1], units_per_rank=[1, 2], max_units=2)
    assert [p.shape for p in out.prefill] == [(1, 1)]
    assert sorted(d.shape for d in out.decode) == [(1, 1), (1, 2)]
    one = candidate_profile(prof, tps=[1], units_per_rank=[1, 2], max_units=1)
    assert [d.shape for d in one.decode] == [(1, 1)] and one.prefill == ()
    with pytest.raises(ValueError, match="decode shapes tp1x3"):     # 3 units fit: asked for
        candidate_profile(prof, tps=[1], units_per_rank=[1, 3], max_units=3)


@pytest.mark.parametrize("text, match", [
    ('{"decode": []}', "kv_bytes_per_token|at least one decode"),
    ('{"decode": [{"tp": 1, "step_base_s": 0.01, "step_per_seq_s": 0.0, "speed": 1}], '
     '"kv_bytes_per_token": 1, "link_bytes_per_s": 1}', "unknown field `speed`"),
    ('{"decode": [{"tp": 1, "step_base_s": 0.01, "step_per_seq_s": 0.0}], '
     '"prefill": [{"tp": 1, "tokens_per_s": -5}], "kv_bytes_per_token": 1, '
     '"link_bytes_per_s": 1}', "tokens_per_s must be"),
    ('{"decode": [{"tp": 1, "step_base_s": 0.01, "step_per_seq_s": 0.0}, '
     '{"tp": 1, "step_base_s": 0.02, "step_per_seq_s": 0.0}], "kv_bytes_per_token": 1, '
     '"link_bytes_per_s": 1}', "given twice"),
    ('{"decode": [{"tp": 0, "step_base_s": 0.01, "step_per_seq_s": 0.0}], '
     '"kv_bytes_per_token": 1, "link_bytes_per_s": 1}', "tp must be"),
    ("not json", "profile"),
])
def test_bad_profiles_are_refused(tmp_path, text, match):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_profile(path)


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="at least one SLO"):
        SLO(None, None)
    with pytest.raises(ValueError, match="attainment"):
        SLO(1.0, 1.0, attainment=1.5)
    with pytest.raises(ValueError, match="target rate"):
        SearchConfig(target_rate=0.0, max_compute=2)
    with pytest.raises(ValueError, match="max compute"):
        SearchConfig(target_rate=1.0, max_compute=0)
    with pytest.raises(ValueError, match="no deployment fits"):
        plan(profile(decode=(msgspec.structs.replace(DEC, tp=4),)), Workload.constant(3, 1, 1),
             SLO(1.0, 1.0), SearchConfig(target_rate=1.0, max_compute=2))
    with pytest.raises(ValueError, match="cannot serve colocated"):
        Deployment(msgspec.structs.replace(DEC, prefill_tokens_per_s=None), 1)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        profile(max_batched_tokens=50)


def test_poisson_arrivals_are_seeded():
    lengths = [(10, 5)] * 20
    a, b, c = (Workload.poisson(lengths, s) for s in (1, 1, 2))
    assert a == b and a != c
    assert (len(a.unit_arrivals_s) - 1) / a.unit_arrivals_s[-1] == pytest.approx(1.0)


class _RouterApp:
    """The router's real FastAPI app (its /metrics route) on uvicorn, on a free port;
    the dispatcher is never started (no nodes)."""

    def __init__(self, policy: str = "cost") -> None:
        from router.app import create_app
        from tests.router_helpers import MODEL, recording_dispatcher
        self.dispatcher = recording_dispatcher(policy)
        app = create_app(self.dispatcher, self.dispatcher.prom, None, MODEL)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the router app did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        asyncio.run(self.dispatcher.close())


def _register(d, node_id: str, role: str, tp: int, cpus: list[int], num_kv_blocks: int = 364,
              kv_bytes_per_token: int = 46080) -> None:
    """A node of ``role`` registers with the router (block size 16)."""
    from tests.router_helpers import register_message
    msg = msgspec.structs.replace(register_message(node_id, role), tp=tp, cpus=cpus,
                                  device="cpu", num_kv_blocks=num_kv_blocks,
                                  kv_bytes_per_token=kv_bytes_per_token)
    d.handlers.handle(node_id, msg, b"")
    assert d.sent[-1][1] == m.Registered(node_id, d.router_id, d.uplink_port)


def _measure(d, steps: int) -> None:
    """``steps`` measurements of every fit, as the nodes and requests send them: prefill
    node p0's and decode node d0's heartbeats (steps ``[prompt tokens, decodes,
    seconds]``), and remote requests' KV transfers and first tokens."""
    sizes = [200 * (i + 1) for i in range(steps)]
    d.handlers.handle("hb:p0", m.Heartbeat("p0", {}, [[n, 0, 0.02 + n / 500] for n in sizes],
                                           0, 0), b"")
    d.handlers.handle("hb:d0", m.Heartbeat(
        "d0", {}, [[n, 0, 0.03 + n / 300] for n in sizes]
        + [[0, b, 0.04 + 0.003 * b] for b in range(1, steps + 1)], 0, 0), b"")
    for i in range(steps):
        rid = f"r{i}"
        d.inflight[rid] = Inflight(rid, [1, 2, 3], SamplingParams(max_tokens=4), [],
                                   time.monotonic(), "d0", "p0", "remote",
                                   transfer_bytes=(i + 1) << 22)
        d.handlers.handle("p0", m.KVSent(rid, None, 0.002 + 0.004 * (i + 1)), b"")
        d.handlers.handle("p0", m.FirstToken(rid, 7, None, 0.0, time.monotonic()), b"")


def test_profile_from_a_routers_metrics():
    """The router's calibrated fits, its nodes' shapes, KV size and capacity, read from
    its /metrics over HTTP, become the profile's figures; flags override them."""
    router = _RouterApp()
    d = router.dispatcher
    _register(d, "p0", "prefill", tp=2, cpus=[0, 1, 2, 3])          # tp2, 2 cores a rank
    _register(d, "d0", "decode", tp=1, cpus=[4, 5])                  # tp1, 2 cores
    _measure(d, 5)
    with router as url:
        prof, warnings = profile_from_metrics(url)
        over, _ = profile_from_metrics(url, prefill_shape=(1, 1), kv_bytes_per_token=1000.0,
                                       kv_capacity_tokens=99)
    cal = d.policy.calibration
    (pre,), (dec,) = prof.prefill, prof.decode
    assert pre.tokens_per_s == pytest.approx(1 / cal.prefill["prefill"].shared.slope)
    assert pre.overhead_s == pytest.approx(cal.prefill["prefill"].shared.intercept)
    assert dec.prefill_tokens_per_s == pytest.approx(1 / cal.prefill["decode"].shared.slope)
    assert dec.step_base_s == pytest.approx(cal.decode_step.shared.intercept)
    assert dec.step_per_seq_s == pytest.approx(cal.decode_step.shared.slope)
    assert prof.link_bytes_per_s == pytest.approx(1 / cal.link.slope)
    assert prof.remote_overhead_s == pytest.approx(cal.remote_overhead.value)
    assert (pre.tp, pre.units_per_rank) == (2, 2)
    assert (dec.tp, dec.units_per_rank, dec.kv_capacity_tokens) == (1, 2, 364 * 16)
    assert prof.kv_bytes_per_token == 46080
    assert warnings == []                                            # 5 measurements each
    (pre,), (dec,) = over.prefill, over.decode
    assert (pre.tp, pre.units_per_rank, dec.kv_capacity_tokens, over.kv_bytes_per_token) == \
        (1, 1, 99, 1000.0)


def test_profile_from_metrics_warns_and_refuses_what_it_cannot_know():
    """Too few measurements and no registered node are warned about; a role's nodes of
    different shapes, or nodes of different KV sizes, are refused unless a flag says."""
    with _RouterApp() as url:                       # nothing registered, nothing measured
        with pytest.raises(ValueError, match="--kv-bytes-per-token is needed.*no node"):
            profile_from_metrics(url)
        prof, warnings = profile_from_metrics(url, kv_bytes_per_token=1.0)
    assert prof.decode[0].kv_capacity_tokens is None
    assert sum("0 measurement(s), fewer than 5" in w for w in warnings) == 5
    assert sum("is registered with the router" in w for w in warnings) == 2
    assert len(warnings) == 7
    router = _RouterApp()
    d = router.dispatcher
    _register(d, "p0", "prefill", tp=1, cpus=[0])
    _register(d, "d0", "decode", tp=1, cpus=[1])
    _measure(d, 3)
    _register(d, "d1", "decode", tp=2, cpus=[2, 3], num_kv_blocks=500)
    _register(d, "p1", "prefill", tp=1, cpus=[4], kv_bytes_per_token=23040)
    with router as url:
        with pytest.raises(ValueError, match=r"decode nodes of different shapes \(d0 tp1x1, "
                                             r"d1 tp2x1\).*--metrics-decode-shape"):
            profile_from_metrics(url, kv_bytes_per_token=1.0)
        with pytest.raises(ValueError, match=r"different KV bytes per token \(\[23040, 46080"):
            profile_from_metrics(url, decode_shape=(2, 1))
        prof, warnings = profile_from_metrics(url, decode_shape=(2, 1), kv_bytes_per_token=1.0)
    assert (prof.decode[0].tp, prof.decode[0].kv_capacity_tokens) == (2, 364 * 16)
    assert [w for w in warnings if "measurement" in w] == [
        f"{what} ({', '.join(terms)}): 3 measurement(s), fewer than 5, so mostly the "
        "router's prior (send some traffic through every path first)"
        for what, _, terms in FITS]
    assert "decode nodes hold 5824..8000 tokens of KV: planned with the smallest, 5824" \
        in warnings


def _plan_args(tmp_path, *extra: str) -> list[str]:
    """``disagg plan`` over the hand-checkable profile and a 200-request Azure CSV at
    constant spacing (100 tokens in, 11 out)."""
    prof = tmp_path / "profile.json"
    prof.write_bytes(profile(unit="core").to_json())
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     + "".join(f"{i},100,11\n" for i in range(200)))
    return ["plan", "--profile", str(prof), "--trace", str(trace), "--start-s", "0",
            "--max-requests", "200", "--length-scale", "1", "--ttft-slo-ms", "250",
            "--tpot-slo-ms", "50", *extra]


def test_plan_command_json(tmp_path):
    """`disagg plan ... --json` in a subprocess: the hand-computed pick, every candidate,
    the attainment at the extra rates; exit 0."""
    args = _plan_args(tmp_path, "--target-rate", "25", "--max-compute", "4", "--rates",
                      "10,25", "--json")
    done = subprocess.run([sys.executable, "-m", "disagg.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    rec = out["recommended"]
    assert (rec["kind"], rec["num_prefill"], rec["num_decode"], rec["compute"]) == \
        ("disaggregated", 3, 1, 4)
    assert out["unit"] == "core" and out["workload"]["requests"] == 200
    assert len(out["configs"]) == 10            # colocated 1..4, then P + D pairs within 4
    by_label = {c["label"]: c for c in out["configs"]}
    assert by_label["2P tp1 + 1D tp1"]["attainment_at"] == {"10": 1.0, "25": pytest.approx(
        by_label["2P tp1 + 1D tp1"]["attainment"])}
    assert "[plan] deployments" in done.stderr          # progress


def test_plan_command_table_and_errors(tmp_path, capsys):
    assert main(_plan_args(tmp_path, "--target-rate", "25", "--max-compute", "3",
                           "--no-progress")) == 1                 # 3 prefill nodes don't fit
    out = capsys.readouterr().out
    assert "no deployment within 3 cores reaches 25 req/s" in out and "2P tp1 + 1D tp1" in out
    assert main(_plan_args(tmp_path, "--target-rate", "25", "--max-compute", "4",
                           "--no-progress")) == 0
    assert "recommended: 3P tp1 + 1D tp1 (4 cores)" in capsys.readouterr().out
    for extra, message in [(("--target-rate", "0", "--max-compute", "4"), "target rate"),
                           (("--target-rate", "1", "--max-compute", "4", "--kinds", "x"),
                            "--kinds"),
                           (("--target-rate", "1", "--max-compute", "4", "--tp", "1,2"),
                            "--tp-efficiency"),
                           (("--target-rate", "1", "--max-compute", "4",
                             "--attainment-target", "0"), "attainment")]:
        assert main(_plan_args(tmp_path, *extra, "--no-progress")) == 2
        assert message in capsys.readouterr().err
    assert main(["plan", "--from-metrics", "http://127.0.0.1:9", "--target-rate", "1",
                 "--max-compute", "2"]) == 2
    assert "did not answer /metrics as a disagg router" in capsys.readouterr().err
    for bad in (["plan", "--target-rate", "1", "--max-compute", "2"],             # no rates
                _plan_args(tmp_path, "--max-compute", "2"),                       # no target
                _plan_args(tmp_path, "--target-rate", "1", "--max-compute", "2", "--tp", "a"),
                _plan_args(tmp_path, "--target-rate", "1", "--max-compute", "2",
                           "--from-metrics", "http://x")):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2

"""Routing policies: static rules, the calibrated TTFT cost model, validation."""

from __future__ import annotations

import math

import pytest

from router.calibration import CostModelConfig
from router.estimates import AffineEstimate
from router.policy import (POLICY_NAMES, AlwaysLocal, AlwaysRemote, CostModel, TokenThreshold,
                           make_policy)
from router.route_types import REASONS, Compute, Decision, NodeLoad, RouteInput

KV = 46080  # SmolLM2: 30 layers x (K, V) x 3 heads x 64 x fp32


def route(n: int, cached_d: int = 0, cached_p: int = 0, running: int = 0, q_d: int = 0,
          q_p: int = 0, prefill: bool = True, decode_id: str = "d0") -> RouteInput:
    """A request of ``n`` prompt tokens against one decode and one prefill node."""
    d = NodeLoad(decode_id, "decode", queued_prefill_tokens=q_d, num_running=running)
    p = NodeLoad("p0", "prefill", queued_prefill_tokens=q_p) if prefill else None
    return RouteInput(n, cached_d, cached_p, KV, d, p)


def crossover(policy, **load) -> int | None:
    """Smallest prompt length (step 16) that the policy sends remote."""
    for n in range(32, 16385, 16):
        if policy.decide(route(n, **load)).route == "remote":
            return n
    return None


# ---- static policies -------------------------------------------------------

def test_always_local_and_always_remote():
    for inp in (route(16), route(5000, running=30)):
        d = AlwaysLocal().decide(inp)
        assert (d.route, d.reason, d.predicted_local_s) == ("local", "always_local", None)
        d = AlwaysRemote().decide(inp)
        assert (d.route, d.reason) == ("remote", "always_remote")
    d = AlwaysRemote().decide(route(5000, prefill=False))
    assert (d.route, d.reason) == ("local", "no_prefill_node")


def test_token_threshold_rules():
    pol = TokenThreshold(min_remote_tokens=256, max_prefill_queue_tokens=1000)
    cases = [
        (route(255), "local", "below_threshold"),
        (route(256), "remote", "above_threshold"),
        (route(1000, cached_d=800), "local", "below_threshold"),  # only 200 uncached on decode
        (route(1000, cached_d=800, cached_p=1000), "local", "below_threshold"),
        (route(4096, q_p=999), "remote", "above_threshold"),
        (route(4096, q_p=1000), "local", "prefill_queue_full"),
        (route(4096, prefill=False), "local", "no_prefill_node"),
    ]
    for inp, want_route, want_reason in cases:
        d = pol.decide(inp)
        assert (d.route, d.reason) == (want_route, want_reason), d.detail
        assert d.predicted_local_s is None and d.predicted_remote_s is None
        assert "threshold=256" in d.detail or want_reason == "no_prefill_node"


def test_make_policy():
    assert isinstance(make_policy(), CostModel)
    assert [make_policy(n).name for n in POLICY_NAMES] == list(POLICY_NAMES)
    pol = make_policy("threshold", min_remote_tokens=10, max_prefill_queue_tokens=20)
    assert (pol.min_remote_tokens, pol.max_prefill_queue_tokens) == (10, 20)
    assert make_policy("cost", link_bytes_per_s=5e8).config.link_bytes_per_s == 5e8
    with pytest.raises(ValueError, match="threshold"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="local"):
        make_policy("local", min_remote_tokens=3)
    with pytest.raises(ValueError, match="valid"):
        make_policy("cost", bandwidth=1)


# ---- cost model: decisions -------------------------------------------------

def test_cost_short_or_cached_prompts_go_local():
    pol = CostModel()
    d = pol.decide(route(1000, cached_d=992, running=8))
    assert (d.route, d.reason) == ("local", "fully_cached")
    d = pol.decide(route(1000, cached_d=960, running=4))  # 40 uncached; remote would recompute 1000
    assert (d.route, d.reason) == ("local", "cost_local_faster")
    assert d.predicted_local_s < d.predicted_remote_s
    d = pol.decide(route(64))  # idle decode node: no stall to pay, no transfer to wait for
    assert (d.route, d.reason) == ("local", "cost_local_faster")


def test_cost_long_uncached_prompt_with_idle_prefill_goes_remote():
    d = CostModel().decide(route(4096, running=8))
    assert (d.route, d.reason) == ("remote", "cost_remote_faster")
    assert "interference" in d.detail and "transfer" in d.detail


def test_cost_long_prefill_queue_goes_local():
    pol = CostModel()
    assert pol.decide(route(2048, running=4)).route == "remote"
    d = pol.decide(route(2048, running=4, q_p=60000))
    assert (d.route, d.reason) == ("local", "cost_local_faster")
    assert d.predicted_remote_s > 100 * 2048 / 350 / 10


def test_cost_prefill_cache_hit_favours_remote():
    pol = CostModel(interference_weight=0.0)
    # The prefill node holds most of the prompt, the decode node none of it.
    b_cold = pol.predict(route(4096, running=1, q_d=8192))
    b_warm = pol.predict(route(4096, cached_p=4000, running=1, q_d=8192))
    assert b_warm.remote_prefill_s < b_cold.remote_prefill_s / 5
    assert b_warm.remote_transfer_s == b_cold.remote_transfer_s  # decode still lacks all of it
    assert pol.decide(route(4096, cached_p=4000, running=1, q_d=8192)).route == "remote"


def test_transfer_counts_only_blocks_the_decode_node_lacks():
    pol = CostModel()
    full = pol.predict(route(4096)).remote_transfer_s
    half = pol.predict(route(4096, cached_d=2048)).remote_transfer_s
    latency = CostModelConfig().link_latency_s
    assert half - latency == pytest.approx((full - latency) / 2)
    assert full - latency == pytest.approx(4096 * KV / 1e9)


def test_ties_go_local():
    # Binary fractions make both paths' predictions exactly equal: 1/16 + 64/256 s.
    cfg = dict(prefill_tokens_per_s=256.0, prefill_overhead_s=0.0, decode_prefill_overhead_s=0.0625,
               link_bytes_per_s=float(1 << 20), link_latency_s=0.0, remote_overhead_s=0.0)
    d = NodeLoad("d0", "decode")
    inp = RouteInput(64, 0, 0, 1024, d, NodeLoad("p0", "prefill"))
    dec = CostModel(**cfg).decide(inp)
    assert dec.predicted_local_s == dec.predicted_remote_s == 0.3125
    assert (dec.route, dec.reason) == ("local", "cost_local_faster")
    cfg["decode_prefill_overhead_s"] = 0.0626
    assert CostModel(**cfg).decide(inp).route == "remote"


def test_no_prefill_node_routes_local():
    d = CostModel().decide(route(8000, running=50, prefill=False))
    assert (d.route, d.reason) == ("local", "no_prefill_node")
    assert d.predicted_local_s > 0 and d.predicted_remote_s is None


def test_predictions_positive_finite_and_reasons_known():
    pol = CostModel()
    for n in (1, 17, 300, 5000):
        for running in (0, 3, 60):
            for q in (0, 10000):
                d = pol.decide(route(n, cached_d=(n // 32) * 16, running=running, q_d=q, q_p=q))
                assert d.reason in REASONS
                for s in (d.predicted_local_s, d.predicted_remote_s):
                    assert s is not None and math.isfinite(s) and s > 0


def test_crossover_moves_with_load():
    pol = CostModel()
    base = crossover(pol, running=2, q_p=4096)
    assert base is not None and 1000 < base < 4000
    assert crossover(pol, running=4, q_p=4096) < base * 0.7   # busier decode → remote sooner
    assert crossover(pol, running=2, q_p=8192) > base * 1.5   # busier prefill → remote later
    assert crossover(pol, running=2, q_p=4096, q_d=2048) < base * 0.7
    assert crossover(pol, running=0, q_p=4096) is None        # nothing to stall, decode idle


# ---- cost model: online calibration ----------------------------------------

def test_slow_link_sends_long_prompts_local():
    pol = CostModel()
    assert pol.decide(route(4096, running=8)).route == "remote"
    for _ in range(20):
        pol.observe_transfer(46_000_000, 46.0)  # 1 MB/s
    d = pol.decide(route(4096, running=8))
    assert (d.route, d.reason) == ("local", "cost_local_faster")
    bw = dict((name, v) for name, _, v in pol.snapshot())["link_bytes_per_s"]
    assert 0.8e6 < bw < 1.3e6


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_exports_what_it_calibrated(name):
    """Static policies calibrate too (TTFT predictions, `disagg plan --from-metrics`)."""
    pol = make_policy(name)
    pol.observe_transfer(46_000_000, 46.0)
    rows = {(n, lab.get("role", "")): v for n, lab, v in pol.snapshot()}
    assert {("prefill_tokens_per_s", "prefill"), ("prefill_tokens_per_s", "decode"),
            ("decode_step_base_s", ""), ("remote_overhead_s", "")} <= set(rows)
    assert rows[("link_bytes_per_s", "")] < 1e8          # moved by the observation


def test_slow_decode_prefill_goes_remote_sooner():
    pol = CostModel()
    before = crossover(pol, running=2, q_p=4096)
    for _ in range(20):
        pol.observe_prefill("decode", "d0", 1024, 1024 / 100)  # 100 tokens/s on d0
    after = crossover(pol, running=2, q_p=4096)
    assert after < before / 2
    # A decode node measured fast keeps prefilling locally longer than the slow one.
    for _ in range(20):
        pol.observe_prefill("decode", "d1", 1024, 1024 / 500)
    assert crossover(pol, running=2, q_p=4096, decode_id="d1") > before


def test_slow_prefill_node_and_remote_overhead_delay_remote():
    pol = CostModel()
    before = crossover(pol, running=4, q_p=2048)
    for _ in range(20):
        pol.observe_prefill("prefill", "p0", 2048, 2048 / 150)
    assert crossover(pol, running=4, q_p=2048) > before * 1.5
    pol2 = CostModel()
    r0 = pol2.predict(route(512)).remote_ttft_s
    for _ in range(30):
        pol2.observe_remote_overhead(0.5)
    assert pol2.predict(route(512)).remote_ttft_s > r0 + 0.4


def test_decode_step_calibration_raises_local_ttft_under_load():
    pol = CostModel()
    t0 = pol.predict(route(3000, running=32)).local_ttft_s
    for b in (8, 32) * 10:
        pol.observe_decode_step("d0", b, 0.05 + 0.05 * b)  # 10x the prior per-sequence cost
    assert pol.predict(route(3000, running=32)).local_ttft_s > t0 + 2 * 32 * 0.04  # 2 chunk steps
    assert pol.predict(route(3000, running=0)).local_ttft_s == pytest.approx(3001 / 350 + 0.05 - 1 / 350)


def test_min_observations_gates_cost_decisions():
    pol = CostModel(min_observations=2)
    d = pol.decide(route(4096, running=8))
    assert (d.route, d.reason) == ("local", "uncalibrated_default")
    for _ in range(2):
        pol.observe_prefill("decode", "d0", 1024, 3.0)
        pol.observe_prefill("prefill", "p0", 1024, 3.0)
        pol.observe_transfer(10_000_000, 0.01)
    assert pol.decide(route(4096, running=8)).reason == "cost_remote_faster"


def test_affine_estimate_prior_and_convergence():
    est = AffineEstimate(0.05, 1 / 350, 1024.0)
    assert est.predict(1024) == pytest.approx(0.05 + 1024 / 350)
    for _ in range(40):
        for x in (128, 2048):
            est.observe(x, 0.2 + 0.004 * x)
    assert est.slope == pytest.approx(0.004, rel=0.1) and est.intercept == pytest.approx(0.2, rel=0.2)
    sharp = AffineEstimate(0.05, 1 / 350, 1024.0, prior_weight=1e-4)
    for _ in range(40):
        for x in (128, 2048):
            sharp.observe(x, 0.2 + 0.004 * x)
    assert sharp.slope == pytest.approx(0.004, rel=1e-3) and sharp.intercept == pytest.approx(0.2, rel=1e-2)
    weird = AffineEstimate(0.05, 1 / 350, 1024.0, prior_weight=1e-4)
    for _ in range(10):
        weird.observe(100, 1.0)
        weird.observe(2000, 0.1)  # longer measured faster: noise, not physics
    assert weird.slope > 0 and weird.intercept >= 0 and weird.predict(1) > 0


# ---- validation ------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: NodeLoad("", "decode"),
    lambda: NodeLoad("x", "colocated"),
    lambda: NodeLoad("x", "decode", queued_prefill_tokens=-1),
    lambda: NodeLoad("x", "decode", num_running=1.5),
    lambda: NodeLoad("x", "decode", kv_usage=1.2),
    lambda: NodeLoad("x", "decode", kv_usage=float("nan")),
    lambda: NodeLoad("x", "decode", tp=0),
    lambda: route(0),
    lambda: route(100, cached_d=101),
    lambda: route(100, cached_p=-16),
    lambda: RouteInput(100, 0, 0, 0, NodeLoad("d", "decode"), None),
    lambda: RouteInput(100, 0, 0, KV, NodeLoad("p", "prefill"), None),
    lambda: RouteInput(100, 0, 0, KV, NodeLoad("d", "decode"), NodeLoad("d2", "decode")),
    lambda: Decision("both", "x"),
    lambda: Decision("local", ""),
    lambda: TokenThreshold(min_remote_tokens=-1),
    lambda: TokenThreshold(max_prefill_queue_tokens=0),
    lambda: CostModelConfig(prefill_tokens_per_s=0),
    lambda: CostModelConfig(decay=1.0),
    lambda: CostModelConfig(interference_weight=-1),
    lambda: CostModelConfig(chunk_tokens=0),
    lambda: CostModel(CostModelConfig(), decay=0.5),
    lambda: CostModel().observe_prefill("colocated", "d0", 10, 1.0),
    lambda: CostModel().observe_prefill("decode", "d0", 0, 1.0),
    lambda: CostModel().observe_prefill("decode", "d0", 10, -1.0),
    lambda: CostModel().observe_transfer(10, float("inf")),
    lambda: CostModel().observe_decode_step("d0", 0, 0.1),
    lambda: CostModel().observe_remote_overhead(float("nan")),
])
def test_bad_inputs_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_static_policies_accept_observations():
    for pol in (AlwaysLocal(), AlwaysRemote(), TokenThreshold()):
        pol.observe_prefill("decode", "d0", 10, 0.1)
        pol.observe_transfer(10, 0.1)
        pol.observe_decode_step("d0", 4, 0.1)
        pol.observe_remote_overhead(0.01)


# ---- cost model: shared compute ---------------------------------------------

TWO_CORES = Compute("boot-1", frozenset({0, 1}), frozenset(), "cpu")


def placed(n: int, prefill_cpus: set[int], running: int = 0, q_d: int = 0, q_p: int = 0,
           machine: str = "boot-1") -> RouteInput:
    """``n`` prompt tokens; the decode node on cores 0-1 of machine boot-1, the
    prefill node on ``prefill_cpus`` of ``machine``."""
    d = NodeLoad("d0", "decode", queued_prefill_tokens=q_d, num_running=running, compute=TWO_CORES)
    p = NodeLoad("p0", "prefill", queued_prefill_tokens=q_p,
                 compute=Compute(machine, frozenset(prefill_cpus), frozenset(), "cpu"))
    return RouteInput(n, 0, 0, KV, d, p)


def test_shared_compute_flips_a_remote_decision_to_local():
    pol = CostModel()
    disjoint = pol.decide(placed(2048, {2, 3}, running=16))
    assert (disjoint.route, disjoint.reason) == ("remote", "cost_remote_faster"), disjoint.detail
    shared = pol.decide(placed(2048, {0, 1}, running=16))          # same loads, same cores
    assert (shared.route, shared.reason) == ("local", "shared_compute_local_faster"), shared.detail
    assert "shared compute 1.00" in shared.detail
    elsewhere = pol.decide(placed(2048, {0, 1}, running=16, machine="boot-2"))
    assert elsewhere.route == "remote"                              # same numbers, other machine


def test_shared_compute_remote_pays_the_local_load_terms():
    pol = CostModel()
    b = pol.predict(placed(2048, {0, 1}, running=16))
    assert b.remote_interference_s == pytest.approx(b.local_interference_s)
    assert b.remote_contention_s == pytest.approx(b.local_ttft_s - pol.predict(
        placed(2048, {0, 1})).local_ttft_s)                         # the ride-along term
    assert b.remote_cost_s - b.local_cost_s == pytest.approx(b.remote_transfer_s + b.remote_overhead_s)
    half = pol.predict(placed(2048, {1, 2}, running=16))            # half the prefill's cores
    assert half.remote_interference_s == pytest.approx(b.remote_interference_s / 2)
    assert half.remote_contention_s == pytest.approx(b.remote_contention_s / 2)
    assert pol.predict(placed(2048, {2, 3}, running=16)).shared_compute_s == 0.0
    idle = pol.decide(placed(2048, {0, 1}))                         # nothing running: plain cost
    assert (idle.route, idle.reason) == ("local", "cost_local_faster")


def test_shared_compute_a_backed_up_decode_queue_is_not_skipped_on_the_same_cores():
    pol = CostModel()
    apart = pol.decide(placed(2048, {2, 3}, q_d=8192))             # decode queue backed up
    assert (apart.route, apart.reason) == ("remote", "cost_remote_faster"), apart.detail
    same = pol.decide(placed(2048, {0, 1}, q_d=8192))              # ... on the prefill's cores
    assert (same.route, same.reason) == ("local", "shared_compute_local_faster"), same.detail
    b = pol.predict(placed(2048, {0, 1}, q_d=8192))
    # the decode queue's prefill delays the remote path as much as the local one
    assert b.remote_contention_s == pytest.approx(
        b.local_ttft_s - pol.predict(placed(2048, {0, 1})).local_ttft_s)
    half = pol.predict(placed(2048, {1, 2}, q_d=8192))              # half the prefill's cores
    assert half.remote_contention_s == pytest.approx(b.remote_contention_s / 2)
    # the prefill node's queue delays a local prefill on shared cores the same way
    q = pol.predict(placed(2048, {0, 1}, q_p=8192))
    assert q.local_contention_s > 0
    assert q.local_ttft_s - q.local_contention_s == pytest.approx(
        pol.predict(placed(2048, {0, 1})).local_ttft_s)
    assert pol.predict(placed(2048, {2, 3}, q_p=8192)).local_contention_s == 0.0
    d = pol.decide(placed(2048, {0, 1}, running=16, q_d=8192, q_p=8192))
    assert d.route == "local", d.detail                             # both backed up alike


@pytest.mark.parametrize("running,q_d,q_p", [(27, 1792, 0), (27, 0, 1792), (8, 4000, 300),
                                              (0, 3000, 0), (40, 2000, 2100)])
def test_shared_compute_with_equal_rates_remote_costs_exactly_the_transfer_and_hops(
        running, q_d, q_p):
    # both nodes at the same (prior) rates on the same cores: whatever the queues and the
    # running decodes, the remote path differs from the local one only by what it adds.
    # (Measured on 2 cores: with the ride-along counted over the decode queue for local
    # but not for remote, a decode queue crossing a chunk boundary sent prompts remote.)
    pol = CostModel()
    b = pol.predict(placed(256, {0, 1}, running=running, q_d=q_d, q_p=q_p))
    assert b.remote_cost_s - b.local_cost_s == pytest.approx(b.remote_transfer_s + b.remote_overhead_s)
    d = pol.decide(placed(256, {0, 1}, running=running, q_d=q_d, q_p=q_p))
    assert d.route == "local", d.detail
    apart = pol.predict(placed(256, {2, 3}, running=running, q_d=q_d, q_p=q_p))
    assert apart.local_contention_s == 0.0 and apart.shared_compute_s == 0.0


def test_shared_compute_interference_follows_the_calibrated_decode_rate():
    pol = CostModel()
    before = pol.predict(placed(1024, {0, 1}, running=4)).remote_interference_s
    for _ in range(30):                       # the decode node's cores turn out 4x slower
        pol.observe_prefill("decode", "d0", 1024, 0.05 + 4 * 1024 / 350)
    after = pol.predict(placed(1024, {0, 1}, running=4)).remote_interference_s
    assert after > 3 * before


def test_shared_compute_an_unmeasured_prefill_node_runs_at_the_decode_nodes_measured_rate():
    # Measured on 2 cores slower than the priors: the decode node's first local prefills
    # taught it the machine's rate while the prefill node kept its prior, so the first
    # prompts of every fresh deployment went remote, onto the same cores.
    pol = CostModel()
    for _ in range(6):
        pol.observe_prefill("decode", "d0", 256, 1.3)
    local = pol.predict(placed(256, {0, 1})).local_ttft_s
    same = pol.predict(placed(256, {0, 1}))
    assert same.remote_prefill_s == pytest.approx(local)
    assert same.remote_cost_s - same.local_cost_s == pytest.approx(
        same.remote_transfer_s + same.remote_overhead_s)
    assert pol.decide(placed(256, {0, 1})).route == "local"
    prior = pol.predict(placed(256, {2, 3})).remote_prefill_s      # cores of its own: the prior
    assert prior < local and pol.decide(placed(256, {2, 3})).route == "remote"
    half = pol.predict(placed(256, {1, 2})).remote_prefill_s       # half of them shared
    assert half == pytest.approx((local + prior) / 2)
    pol.observe_prefill("prefill", "p0", 256, 0.2)                 # measured: its own fit counts
    measured = pol.predict(placed(256, {0, 1})).remote_prefill_s
    assert measured < prior and pol.decide(placed(256, {0, 1})).route == "remote"


def test_compute_checks():
    with pytest.raises(ValueError, match="device"):
        Compute(device="tpu")
    with pytest.raises(ValueError, match="cpu"):
        Compute("m", frozenset({-1}))
    with pytest.raises(ValueError, match="compute"):
        NodeLoad("d0", "decode", compute="boot-1")
    with pytest.raises(ValueError, match="shared"):
        CostModel().calibration.predict(decode_node="d0", decode_queue=0, num_running=0,
                                        uncached_decode=1, prefill_node="p0", prefill_queue=0,
                                        uncached_prefill=1, transfer_bytes=0, shared=1.5)

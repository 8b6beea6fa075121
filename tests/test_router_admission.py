"""Early rejection by predicted TTFT (``router.admission``) and every policy's TTFT
prediction (``RoutingPolicy.predict_ttft``)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from disagg.cluster import ClusterConfig
from router.admission import TTFTAdmission
from router.errors import ProtocolError
from router.metrics import RouterMetrics
from router.policy import MIN_PREDICTION_OBSERVATIONS, POLICY_NAMES, CostModel, make_policy
from router.route_types import NodeLoad, RouteInput


def route(prompt: int = 512, queued: int = 0, running: int = 0, prefill: bool = True) -> RouteInput:
    return RouteInput(prompt, 0, 0, 1000, NodeLoad("d0", "decode", queued, running),
                      NodeLoad("p0", "prefill") if prefill else None, 16)


def calibrate(policy, local: int = MIN_PREDICTION_OBSERVATIONS, remote: int = 0) -> None:
    """Feed ``local`` decode-node and ``remote`` prefill-node + link measurements."""
    for _ in range(local):
        policy.observe_prefill("decode", "d0", 1000, 2.0)          # 500 tokens/s
    for _ in range(remote):
        policy.observe_prefill("prefill", "p0", 1000, 1.0)
        policy.observe_transfer(10_000_000, 0.01)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_predicts_ttft_once_calibrated_and_not_before(name):
    policy = make_policy(name)
    assert policy.predict_ttft(route(), "local") is None          # priors only: no prediction
    calibrate(policy, MIN_PREDICTION_OBSERVATIONS - 1)
    assert policy.predict_ttft(route(), "local") is None
    calibrate(policy, 1)
    local = policy.predict_ttft(route(), "local")
    assert local == pytest.approx(CostModel().predict(route()).local_ttft_s, rel=1.0)
    assert local == policy.predict(route()).local_ttft_s
    # a longer queue ahead of it, a later first token; the same estimator whatever the policy
    assert policy.predict_ttft(route(queued=4000), "local") > local + 4
    assert policy.predict_ttft(route(), "remote") is None          # the link is not measured
    calibrate(policy, 0, MIN_PREDICTION_OBSERVATIONS)
    assert policy.predict_ttft(route(), "remote") == policy.predict(route()).remote_ttft_s
    # no prefill node: "remote" means the local path it falls back to
    assert policy.predict_ttft(route(prefill=False), "remote") == \
        policy.predict_ttft(route(prefill=False), "local")


def test_admission_refuses_only_predictions_over_the_slo():
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    policy = make_policy("local")
    gate = TTFTAdmission(1.0, policy, metrics)
    gate.check(route(queued=100_000), "local")                     # uncalibrated: admitted
    calibrate(policy)
    gate.check(route(prompt=100), "local")                         # ~0.2 s: admitted
    with pytest.raises(ProtocolError) as info:
        gate.check(route(prompt=100, queued=5000), "local")        # ~10 s: refused
    err = info.value
    assert err.status == 429 and err.code == "ttft_slo_exceeded" and err.type == "rate_limit_error"
    assert "SLO of 1 s" in err.message and "5000 prompt tokens queued" in err.message
    assert registry.get_sample_value("disagg_rejected_total", {"reason": "predicted_ttft"}) == 1
    assert registry.get_sample_value("disagg_rejected_total", {"reason": "max_inflight"}) == 0
    TTFTAdmission(None, policy, metrics).check(route(queued=10**6), "local")   # off


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_bad_slo_is_refused(bad):
    with pytest.raises(ValueError, match="SLO"):
        TTFTAdmission(bad, make_policy("cost"), RouterMetrics(CollectorRegistry()))
    if not isinstance(bad, (bool, str)):
        with pytest.raises(ValueError, match="reject_ttft_slo_s"):
            ClusterConfig(reject_ttft_slo_s=bad)

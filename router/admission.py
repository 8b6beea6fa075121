"""Early rejection (Mooncake's): refuse at once a request that would miss its TTFT SLO.

With ``--reject-ttft-slo-s S`` the router asks the routing policy, for every request
it is about to send, what its time to first token will be on the route just chosen
(:meth:`router.policy.RoutingPolicy.predict_ttft`: the cost model's formulas over the
decode node's queued prefill tokens, its running requests and the online-calibrated
rates, whatever the policy). Above ``S`` the request is refused before any node sees
it: HTTP 429 with ``Retry-After`` and an OpenAI error body (code
``ttft_slo_exceeded``) saying so, counted in ``disagg_rejected_total{reason=
"predicted_ttft"}``. Better a fast 429 the client can retry elsewhere or later than
a request that queues, misses its SLO anyway and makes the ones behind it late too.

Before the rates are calibrated there is no prediction and nothing is refused: a
path's prediction needs :data:`router.policy.MIN_PREDICTION_OBSERVATIONS`
measurements of every fit it uses (a few requests' prefill steps, reported in the
nodes' heartbeats), so a cold router admits everything until it has measured.
"""

from __future__ import annotations

import math

from router.errors import ProtocolError
from router.metrics import RouterMetrics
from router.policy import RoutingPolicy
from router.route_types import RouteInput


class TTFTAdmission:
    """Refuses requests whose predicted TTFT exceeds ``slo_s`` (``None``: admits all)."""

    def __init__(self, slo_s: float | None, policy: RoutingPolicy, metrics: RouterMetrics) -> None:
        if slo_s is not None and (isinstance(slo_s, bool) or not isinstance(slo_s, (int, float))
                                  or not math.isfinite(slo_s) or slo_s <= 0):
            raise ValueError(f"the TTFT SLO must be a finite number of seconds > 0, got {slo_s!r}")
        self.slo_s = slo_s
        self.policy = policy
        self.metrics = metrics

    def check(self, inp: RouteInput, route: str) -> None:
        """Raise a 429 :class:`ProtocolError` if ``inp`` on ``route`` is predicted to
        take longer than the SLO to its first token (and count it)."""
        if self.slo_s is None:
            return
        ttft = self.policy.predict_ttft(inp, route)
        if ttft is None or ttft <= self.slo_s:
            return
        self.metrics.rejected.labels(reason="predicted_ttft").inc()
        queued = inp.decode.queued_prefill_tokens
        raise ProtocolError(
            429, f"the predicted time to first token ({ttft:.2f} s, {queued} prompt tokens "
                 f"queued) exceeds this server's SLO of {self.slo_s:g} s; retry later",
            code="ttft_slo_exceeded", type="rate_limit_error")

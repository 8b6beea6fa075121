"""Routing policies: per request, prefill locally on the decode node or remotely?

The router fills a :class:`RouteInput` from the nodes' latest heartbeats
(:class:`~router.route_types.NodeLoad`) and its prefix-cache look-ups, asks a policy to
``decide``, and counts ``Decision.reason`` in /metrics (a short, fixed
vocabulary: :data:`router.route_types.REASONS`) while logging ``Decision.detail``. It feeds
measured durations back through the ``observe_*`` hooks. Policies are pure:
no I/O, no clocks, deterministic, meant for one asyncio loop.

The default :class:`CostModel` predicts both paths' time to first token::

    local  = prefill_d(q_d + u_d) + ride(q_d + u_d + σ · q_p)       (TTFT)
           + σ · q_p · s_per_token_p                                (contention)
           + w · running · u_d · s_per_token_d                      (interference)
    remote = prefill_p(q_p + u_p) + link(bytes lacking on decode) + hop overhead
           + σ · (ride(q_p + u_p + σ · q_d) + q_d · s_per_token_d)  (contention)
           + σ · w · running · u_p · s_per_token_d                  (interference)

    ride(n) = steps(n) · per_seq_d · running, steps(n) = ceil(n / (chunk - running))

    u_d, u_p = uncached prompt tokens on the decode / prefill node
    q_d, q_p = tokens already queued for prefill on that node
    prefill_x(n) = overhead + s_per_token · n, link(b) = latency + b / bandwidth

Interference: while a local prefill runs, every running decode's next token
waits for the chunk steps, i.e. for the prefill compute of this request's
``u_d`` tokens (queued tokens stall them whichever way this request goes).
With ``interference_weight = 1`` a second of stall to one running request
weighs as much as a second of the new request's TTFT, so the policy minimises
the total latency it adds. Deployments judged on mean TPOT rather than per-token
latency may lower it (e.g. to 1 / typical output length). Ties go local; a
prompt whose decode node lacks at most one block is "fully_cached" → local.

Shared compute (σ = ``RouteInput.shared_compute``, from what the nodes
reported at registration: the fraction of the prefill node's cores, or GPUs,
that are the decode node's too; 0 on disjoint or unknown compute): a remote
prefill on the decode node's cores slows its running decodes as much as a
local prefill of those tokens would, and they slow it just as they slow a
local chunk step, so the remote path pays the local path's two load terms
(scaled by σ) on top of the transfer and the hops. Queues are shared the
same way: the decode node's queued prefill runs on those cores too, so a
remote prefill waits for it as much as a local one would (and a local one
for the prefill node's queue), and the running decodes ride along both
queues' chunk steps whichever node computes the prompt (counting the ride
over one node's queue only made a decode queue that crossed a chunk boundary
send prompts remote on 2 cores, and lose to ``--policy local``). Moving a
prompt to the other node's queue skips no work there; measured on 2 cores
(``disagg bench serve``), routing around a long local queue onto the same
cores lost throughput to running two engines' threads at once. With σ = 1
and equal calibrated rates, remote costs exactly the transfer and the hops
more than local, so it wins only when the prefill node holds more of the
prompt in its prefix cache than those cost; on a machine too small to split
the nodes the router learns to prefill locally (the rates stay online-calibrated
per node, contention included). A prefill node without a measurement of its own
is predicted at the decode node's measured rate for the share σ of its compute
that is the decode node's (the same cores run at the same rate), at the prior
for the rest. A decision that the shared-compute terms
flipped to local has reason "shared_compute_local_faster".
``kv_usage``, ``num_waiting`` and ``tp`` are not model inputs: rates are
learned per node, which absorbs TP and hardware differences.

Every policy, the static ones too, keeps this calibration (the ``observe_*``
hooks feed it) and answers :meth:`RoutingPolicy.predict_ttft`: the TTFT the
formulas above predict for the path a request takes. The router refuses a
request early when that prediction exceeds its SLO (``--reject-ttft-slo-s``).
A prediction needs measurements: until the fits its path uses have
:data:`MIN_PREDICTION_OBSERVATIONS` each, there is none (the priors are rough
figures for one machine, not grounds to refuse anyone).
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod

from .calibration import Calibration, CostBreakdown, CostModelConfig
from .estimates import check_count
from .route_types import Decision, RouteInput

__all__ = ["AlwaysLocal", "AlwaysRemote", "CostModel", "MIN_PREDICTION_OBSERVATIONS",
           "POLICY_NAMES", "RoutingPolicy", "TokenThreshold", "add_policy_arg", "make_policy"]

MIN_PREDICTION_OBSERVATIONS = 5
"""Measurements each fit a path's TTFT prediction uses must have before
:meth:`RoutingPolicy.predict_ttft` predicts it (a few requests' prefill steps)."""


class RoutingPolicy(ABC):
    """Decides local vs remote prefill per request; learns rates from measurements.

    ``config``: the priors of the calibration every policy keeps for
    :meth:`predict_ttft` (defaults: :class:`CostModelConfig`'s).
    """

    name = "abstract"

    def __init__(self, config: CostModelConfig | None = None) -> None:
        self.calibration = Calibration(config or CostModelConfig())

    @abstractmethod
    def decide(self, inp: RouteInput) -> Decision:
        """Route one request (pure: no I/O, no clocks)."""

    def observe_prefill(self, role: str, node_id: str, num_tokens: int, seconds: float) -> None:
        """A prefill of ``num_tokens`` computed (uncached) tokens on a ``role``
        node took ``seconds`` from its first scheduled step to its last, queueing
        excluded: calibrates ``role``'s prefill rate (and ``node_id``'s own)."""
        self.calibration.observe_prefill(role, node_id, num_tokens, seconds)

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        """A KV transfer of ``num_bytes`` took ``seconds``: calibrates the link."""
        self.calibration.observe_transfer(num_bytes, seconds)

    def observe_decode_step(self, node_id: str, batch_size: int, seconds: float) -> None:
        """A decode step of ``batch_size`` sequences took ``seconds`` on ``node_id``."""
        self.calibration.observe_decode_step(node_id, batch_size, seconds)

    def observe_remote_overhead(self, seconds: float) -> None:
        """A remote request's measured TTFT minus its prefill and transfer
        seconds (the extra hops' cost): calibrates the remote path's fixed overhead."""
        self.calibration.observe_remote_overhead(seconds)

    def snapshot(self) -> list[tuple[str, dict[str, str], float]]:
        """The calibrated estimates, for /metrics gauges (every policy calibrates)."""
        return self.calibration.snapshot()

    def predict(self, inp: RouteInput) -> CostBreakdown:
        """Both paths' predicted terms for ``inp`` under the current calibration."""
        d, p = inp.decode, inp.prefill
        return self.calibration.predict(
            decode_node=d.node_id, decode_queue=d.queued_prefill_tokens, num_running=d.num_running,
            uncached_decode=inp.uncached_decode, prefill_node=None if p is None else p.node_id,
            prefill_queue=0 if p is None else p.queued_prefill_tokens,
            uncached_prefill=inp.uncached_prefill, transfer_bytes=inp.transfer_bytes,
            shared=inp.shared_compute)

    def predict_ttft(self, inp: RouteInput, route: str) -> float | None:
        """Predicted seconds to the first token of ``inp`` prefilled on ``route``
        ("local", or "remote": local when there is no prefill node), whatever the
        policy; None while the fits that path uses have fewer than
        :data:`MIN_PREDICTION_OBSERVATIONS` measurements each (no prediction)."""
        remote = route == "remote" and inp.prefill is not None
        if self.calibration.observations("remote" if remote else "local") \
                < MIN_PREDICTION_OBSERVATIONS:
            return None
        b = self.predict(inp)
        return b.remote_ttft_s if remote else b.local_ttft_s


def _basics(inp: RouteInput) -> str:
    return f"prompt={inp.num_prompt_tokens} uncached_decode={inp.uncached_decode}"


def _no_prefill(inp: RouteInput, local_s: float | None = None) -> Decision:
    return Decision("local", "no_prefill_node", local_s, None, f"{_basics(inp)}; no healthy prefill node")


class AlwaysLocal(RoutingPolicy):
    """Every request prefills on its decode node (a colocated baseline)."""

    name = "local"

    def decide(self, inp: RouteInput) -> Decision:
        """Always "local"."""
        return Decision("local", "always_local", detail=_basics(inp))


class AlwaysRemote(RoutingPolicy):
    """Every request prefills on a prefill node, unless none is healthy."""

    name = "remote"

    def decide(self, inp: RouteInput) -> Decision:
        """"remote", or "local" with reason "no_prefill_node"."""
        if inp.prefill is None:
            return _no_prefill(inp)
        return Decision("remote", "always_remote", detail=_basics(inp))


class TokenThreshold(RoutingPolicy):
    """Remote iff the decode node lacks >= ``min_remote_tokens`` prompt tokens and
    the prefill node has fewer than ``max_prefill_queue_tokens`` queued."""

    name = "threshold"

    def __init__(self, min_remote_tokens: int = 256, max_prefill_queue_tokens: int = 8192) -> None:
        super().__init__()
        check_count("min_remote_tokens", min_remote_tokens)
        check_count("max_prefill_queue_tokens", max_prefill_queue_tokens, 1)
        self.min_remote_tokens = min_remote_tokens
        self.max_prefill_queue_tokens = max_prefill_queue_tokens

    def decide(self, inp: RouteInput) -> Decision:
        """Static threshold rule (see the class docstring)."""
        if inp.prefill is None:
            return _no_prefill(inp)
        queue = inp.prefill.queued_prefill_tokens
        detail = (f"{_basics(inp)} threshold={self.min_remote_tokens} prefill_queue={queue} "
                  f"queue_limit={self.max_prefill_queue_tokens}")
        if inp.uncached_decode < self.min_remote_tokens:
            return Decision("local", "below_threshold", detail=detail)
        if queue >= self.max_prefill_queue_tokens:
            return Decision("local", "prefill_queue_full", detail=detail)
        return Decision("remote", "above_threshold", detail=detail)


class CostModel(RoutingPolicy):
    """Default policy: predict both paths' TTFT from online-calibrated rates and
    pick the cheaper (see the module docstring; rates in :mod:`router.calibration`).

    Build with a :class:`CostModelConfig` or its fields as keyword arguments.
    """

    name = "cost"

    def __init__(self, config: CostModelConfig | None = None, **priors) -> None:
        if config is not None and priors:
            raise ValueError("give either a CostModelConfig or keyword priors, not both")
        if config is None:
            try:
                config = CostModelConfig(**priors)
            except TypeError:
                valid = sorted(CostModelConfig.__dataclass_fields__)
                raise ValueError(f"unknown cost-model options {sorted(priors)}; valid: {valid}") from None
        super().__init__(config)
        self.config = config

    def decide(self, inp: RouteInput) -> Decision:
        """Route to the path with the lower predicted cost (ties → local)."""
        b = self.predict(inp)
        if inp.prefill is None:
            return _no_prefill(inp, b.local_ttft_s)
        detail = self._detail(inp, b)
        args = (b.local_ttft_s, b.remote_ttft_s, detail)
        if inp.num_prompt_tokens - inp.num_cached_tokens_decode <= inp.block_size:
            return Decision("local", "fully_cached", *args)
        if self.calibration.min_count() < self.config.min_observations:
            return Decision("local", "uncalibrated_default", *args)
        if b.local_cost_s <= b.remote_cost_s:
            flipped = b.local_cost_s > b.remote_cost_s - b.shared_compute_s
            return Decision("local", "shared_compute_local_faster" if flipped else "cost_local_faster",
                            *args)
        return Decision("remote", "cost_remote_faster", *args)

    def _detail(self, inp: RouteInput, b: CostBreakdown) -> str:
        return (f"local={b.local_cost_s:.3f}s (ttft {b.local_ttft_s:.3f}s + interference "
                f"{b.local_interference_s:.3f}s, {inp.decode.num_running} running, "
                f"queue {inp.decode.queued_prefill_tokens}, uncached {inp.uncached_decode}, "
                f"contention {b.local_contention_s:.3f}s) "
                f"remote={b.remote_ttft_s:.3f}s (prefill {b.remote_prefill_s:.3f}s queue "
                f"{inp.prefill.queued_prefill_tokens} uncached {inp.uncached_prefill}, transfer "
                f"{b.remote_transfer_s:.3f}s {inp.transfer_bytes / 1e6:.1f}MB, overhead "
                f"{b.remote_overhead_s:.3f}s, shared compute {inp.shared_compute:.2f}: contention "
                f"{b.remote_contention_s:.3f}s + interference {b.remote_interference_s:.3f}s) "
                f"prompt={inp.num_prompt_tokens}")


_FACTORIES = {cls.name: cls for cls in (CostModel, AlwaysLocal, AlwaysRemote, TokenThreshold)}
#: the policies :func:`make_policy` builds, by name (what ``--policy`` accepts)
POLICY_NAMES = tuple(_FACTORIES)


def add_policy_arg(p: argparse.ArgumentParser, default: str = "cost") -> None:
    """``--policy``: one of :data:`POLICY_NAMES` (``default`` may come from the environment;
    :func:`make_policy` refuses a bad one)."""
    p.add_argument("--policy", default=default, choices=POLICY_NAMES,
                   help="local vs remote prefill: cost model (default), always local, always "
                        "remote, or a token threshold")


def make_policy(name: str = "cost", **kwargs) -> RoutingPolicy:
    """Build a policy by name: one of :data:`POLICY_NAMES`, "cost" by default."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {POLICY_NAMES}")
    try:
        return _FACTORIES[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for routing policy {name!r}: {exc}") from None

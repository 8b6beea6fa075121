"""Online calibration behind the cost-model routing policy.

:class:`Calibration` holds every fit the cost model (:class:`router.policy.CostModel`)
predicts from, seeded by the priors in :class:`CostModelConfig` and fed by the
router's measurements::

    prefill seconds   = overhead + s_per_token · tokens      (per role, per node)
    transfer seconds  = latency  + bytes / bandwidth          (one link estimate)
    decode step       = base     + s_per_seq · batch_size     (per decode node)
    remote overhead   = weighted mean of measured extra hop cost

The fitting method (decayed ridge regression toward the prior line) lives in
:mod:`router.estimates`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .estimates import (DECODE_X_REF, LINK_X_REF, PREFILL_X_REF, AffineEstimate, KeyedEstimates,
                        MeanEstimate, check_count, check_measure)

__all__ = ["Calibration", "CostBreakdown", "CostModelConfig"]


@dataclass(frozen=True)
class CostModelConfig:
    """Priors and knobs of :class:`router.policy.CostModel`.

    Defaults are rough figures for one engine on this 2-core CPU machine
    (SmolLM2 fp32: prefill ~350 tokens/s, decode step ~60 ms at batch 1 and
    ~135 ms at batch 16, loopback ZeroMQ ~1 GB/s). They only seed the fits.

    prefill_tokens_per_s / prefill_overhead_s: prior prefill rate and fixed
        per-prefill cost on a prefill node.
    decode_prefill_tokens_per_s / decode_prefill_overhead_s: the same on a
        decode node (``None`` = same as the prefill node's prior).
    link_bytes_per_s / link_latency_s: prior KV link bandwidth and per-transfer latency.
    decode_step_base_s / decode_step_per_seq_s: prior decode step time
        ``base + per_seq · batch_size``.
    remote_overhead_s: prior fixed extra cost of the remote path's control hops
        (router → prefill node → decode node admission); refined by
        ``observe_remote_overhead`` when the router measures it.
    interference_weight: how much one second of stall suffered by one running
        decode counts against one second of the new request's TTFT (1.0 = the
        same: the router minimises total added latency over all requests).
    chunk_tokens: the decode engine's per-step token budget
        (``EngineConfig.max_num_batched_tokens``): a local prefill of N tokens
        spans ``ceil(N / (chunk_tokens - running))`` steps.
    decay / prior_weight: see :mod:`router.estimates`.
    min_observations: until every role's prefill fit and the link fit have at
        least this many observations, decide "local" with reason
        "uncalibrated_default" (0 = trust the priors from the start).
    """

    prefill_tokens_per_s: float = 350.0
    prefill_overhead_s: float = 0.05
    decode_prefill_tokens_per_s: float | None = None
    decode_prefill_overhead_s: float | None = None
    link_bytes_per_s: float = 1e9
    link_latency_s: float = 0.002
    decode_step_base_s: float = 0.055
    decode_step_per_seq_s: float = 0.005
    remote_overhead_s: float = 0.005
    interference_weight: float = 1.0
    chunk_tokens: int = 2048
    decay: float = 0.95
    prior_weight: float = 1.0
    min_observations: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name.startswith("decode_prefill"):
                continue
            if f.name in ("chunk_tokens", "min_observations"):
                check_count(f.name, value)
            else:
                check_measure(f.name, value)
        for name in ("prefill_tokens_per_s", "link_bytes_per_s", "decode_step_per_seq_s",
                     "decode_prefill_tokens_per_s", "prior_weight", "chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1) (weight kept per observation), got {self.decay!r}")


@dataclass(frozen=True)
class CostBreakdown:
    """The cost model's terms for one request, in seconds (remote terms are
    ``None`` when there is no prefill node).

    ``remote_contention_s`` / ``remote_interference_s``: what the remote path
    pays because the prefill node shares compute with the decode node (0 when
    disjoint): the decode node's running requests and queued prefill slowing the
    prefill, and the weighted stall the prefill inflicts on the running requests;
    ``local_contention_s`` (part of ``local_ttft_s``): the prefill node's queued
    prefill slowing a local one the same way, and the decodes riding along it
    (see :mod:`router.policy`).
    """

    local_ttft_s: float
    local_interference_s: float
    remote_prefill_s: float | None
    remote_transfer_s: float | None
    remote_overhead_s: float | None
    remote_contention_s: float = 0.0
    remote_interference_s: float = 0.0
    local_contention_s: float = 0.0

    @property
    def local_cost_s(self) -> float:
        """What "local" costs: its TTFT plus the weighted stall of running decodes."""
        return self.local_ttft_s + self.local_interference_s

    @property
    def remote_ttft_s(self) -> float | None:
        """Predicted TTFT of the remote path."""
        if self.remote_prefill_s is None:
            return None
        return (self.remote_prefill_s + self.remote_contention_s + self.remote_transfer_s
                + self.remote_overhead_s)

    @property
    def remote_cost_s(self) -> float | None:
        """What "remote" costs: its TTFT plus the weighted stall of running decodes
        on shared compute."""
        ttft = self.remote_ttft_s
        return None if ttft is None else ttft + self.remote_interference_s

    @property
    def shared_compute_s(self) -> float:
        """What shared compute adds to the remote cost beyond what it adds to the local one."""
        return self.remote_contention_s + self.remote_interference_s - self.local_contention_s


class Calibration:
    """All fits the cost model predicts from; fed by the router's measurements."""

    def __init__(self, config: CostModelConfig) -> None:
        c = config
        d_rate = c.decode_prefill_tokens_per_s or c.prefill_tokens_per_s
        d_over = c.prefill_overhead_s if c.decode_prefill_overhead_s is None else c.decode_prefill_overhead_s
        kw = dict(prior_weight=c.prior_weight, decay=c.decay)
        self.prefill = {
            "prefill": KeyedEstimates(AffineEstimate(c.prefill_overhead_s, 1.0 / c.prefill_tokens_per_s,
                                                     PREFILL_X_REF, **kw)),
            "decode": KeyedEstimates(AffineEstimate(d_over, 1.0 / d_rate, PREFILL_X_REF, **kw)),
        }
        self.link = AffineEstimate(c.link_latency_s, 1.0 / c.link_bytes_per_s, LINK_X_REF, **kw)
        self.decode_step = KeyedEstimates(AffineEstimate(c.decode_step_base_s, c.decode_step_per_seq_s,
                                                         DECODE_X_REF, **kw))
        self.remote_overhead = MeanEstimate(c.remote_overhead_s, **kw)
        self.config = c

    def observe_prefill(self, role: str, node_id: str, num_tokens: int, seconds: float) -> None:
        """A prefill of ``num_tokens`` computed tokens took ``seconds`` on ``node_id``."""
        if role not in self.prefill:
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        check_count("num_tokens", num_tokens, 1)
        self.prefill[role].observe(str(node_id), num_tokens, check_measure("seconds", seconds))

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        """Moving ``num_bytes`` of KV took ``seconds`` (not hidden behind compute)."""
        check_count("num_bytes", num_bytes, 0)
        self.link.observe(num_bytes, check_measure("seconds", seconds))

    def observe_decode_step(self, node_id: str, batch_size: int, seconds: float) -> None:
        """A decode step over ``batch_size`` sequences took ``seconds``."""
        check_count("batch_size", batch_size, 1)
        self.decode_step.observe(str(node_id), batch_size, check_measure("seconds", seconds))

    def observe_remote_overhead(self, seconds: float) -> None:
        """A remote request's TTFT exceeded its prefill + transfer time by ``seconds``."""
        self.remote_overhead.observe(check_measure("seconds", seconds))

    def predict(self, *, decode_node: str, decode_queue: int, num_running: int, uncached_decode: int,
                prefill_node: str | None, prefill_queue: int, uncached_prefill: int,
                transfer_bytes: int, shared: float = 0.0) -> CostBreakdown:
        """Both paths' terms (formulas in :mod:`router.policy`); no remote terms
        when ``prefill_node`` is None. ``shared``: the fraction of the prefill
        node's compute on the decode node's cores or GPUs (0..1)."""
        if not 0.0 <= check_measure("shared", shared) <= 1.0:
            raise ValueError(f"shared must be in [0, 1], got {shared!r}")
        fit = self.prefill["decode"].get(decode_node)
        tokens = decode_queue + uncached_decode
        ride = self._ride_along(decode_node, tokens, num_running)
        ttft = fit.predict(tokens) + ride
        stall = self.config.interference_weight * num_running * fit.slope * uncached_decode
        if prefill_node is None:
            return CostBreakdown(ttft, stall, None, None, None)
        p_intercept, p_slope = self._prefill_node_fit(prefill_node, fit, shared)
        remote_tokens = prefill_queue + uncached_prefill
        prefill_s = p_intercept + p_slope * remote_tokens
        # On shared compute the other node's queued prefill runs on the same cores:
        # moving a prompt from one queue to the other does not skip that work, and the
        # running decodes ride along all of it (both queues and the prompt), whichever
        # node computes the prompt.
        local_contention = shared * p_slope * prefill_queue + (
            self._ride_along(decode_node, tokens + shared * prefill_queue, num_running) - ride)
        contention = shared * (
            self._ride_along(decode_node, remote_tokens + shared * decode_queue, num_running)
            + fit.slope * decode_queue)
        remote_stall = shared * self.config.interference_weight * num_running * fit.slope * uncached_prefill
        return CostBreakdown(ttft + local_contention, stall, prefill_s,
                             self.link.predict(transfer_bytes), self.remote_overhead.value,
                             contention, remote_stall, local_contention)

    def _prefill_node_fit(self, prefill_node: str, decode_fit: AffineEstimate,
                          shared: float) -> tuple[float, float]:
        """The prefill node's prefill ``(overhead, seconds per token)``: its own fit once it
        has a measurement. Before, the share ``shared`` of its compute that is the decode
        node's runs at the rate measured there, the rest at the prior: on one machine's
        cores the prior alone (a faster machine's rate) made remote look cheaper than
        local as soon as the decode node's first local prefills had taught it the real
        rate, and sent the first prompts of every fresh deployment remote on 2 cores."""
        table = self.prefill["prefill"]
        own = table.get(prefill_node)
        if not shared or prefill_node in table.per_key:
            return own.intercept, own.slope
        return (shared * decode_fit.intercept + (1.0 - shared) * own.intercept,
                shared * decode_fit.slope + (1.0 - shared) * own.slope)

    def _ride_along(self, decode_node: str, tokens: float, num_running: int) -> float:
        """Seconds the decode node's running requests add to a prefill of ``tokens``
        on its compute: one decode of each per chunk step."""
        if not num_running:
            return 0.0
        steps = math.ceil(tokens / max(self.config.chunk_tokens - num_running, 1))
        return steps * self.decode_step.get(decode_node).slope * num_running

    def observations(self, route: str) -> int:
        """Fewest observations among the fits a ``route`` TTFT prediction uses ("local":
        the decode role's prefill; "remote": the prefill role's prefill and the link)."""
        if route == "local":
            return self.prefill["decode"].shared.count
        return min(self.prefill["prefill"].shared.count, self.link.count)

    def min_count(self) -> int:
        """Fewest observations among the fits a decision needs (both prefill roles, link)."""
        return min(self.prefill["prefill"].shared.count, self.prefill["decode"].shared.count,
                   self.link.count)

    def snapshot(self) -> list[tuple[str, dict[str, str], float]]:
        """Current estimates as ``(name, labels, value)`` rows (for /metrics gauges).

        Node ``"*"`` is the shared fit used for nodes not yet observed.
        """
        return [(name, labels, value) for name, labels, value, _ in self._terms()]

    def observation_counts(self, nodes: frozenset[str] | None = None
                           ) -> list[tuple[str, dict[str, str], int]]:
        """How many measurements back each :meth:`snapshot` row, as ``(name, labels,
        count)`` rows with the same names and labels (the
        ``disagg_cost_model_observations`` gauges). ``nodes``: only the rows whose
        node label (``"*"``: a shared fit; ``""``: the link and remote overhead, which
        have no node label) is one of these; None: every row."""
        return [(name, labels, count) for name, labels, _, count in self._terms(nodes)]

    def _terms(self, nodes: frozenset[str] | None = None
               ) -> list[tuple[str, dict[str, str], float, int]]:
        """``(name, labels, value, observations)`` of every exported term (of ``nodes``:
        see :meth:`observation_counts`; looked up, so a heartbeat's few rows cost the
        same however many nodes there are)."""
        rows: list[tuple[str, dict[str, str], float, int]] = []

        def keyed(table: KeyedEstimates) -> list[tuple[str, AffineEstimate]]:
            if nodes is None:
                return [("*", table.shared), *table.per_key.items()]
            return [(k, table.shared if k == "*" else table.per_key[k]) for k in sorted(nodes)
                    if k == "*" or k in table.per_key]

        for role, table in self.prefill.items():
            for node, est in keyed(table):
                labels = {"role": role, "node": node}
                rows.append(("prefill_tokens_per_s", labels, 1.0 / est.slope, est.count))
                rows.append(("prefill_overhead_s", labels, est.intercept, est.count))
        if nodes is None or "" in nodes:
            rows.append(("link_bytes_per_s", {}, 1.0 / self.link.slope, self.link.count))
            rows.append(("link_latency_s", {}, self.link.intercept, self.link.count))
            rows.append(("remote_overhead_s", {}, self.remote_overhead.value,
                         self.remote_overhead.count))
        for node, est in keyed(self.decode_step):
            rows.append(("decode_step_base_s", {"node": node}, est.intercept, est.count))
            rows.append(("decode_step_per_seq_s", {"node": node}, est.slope, est.count))
        return rows

"""The router's Prometheus metrics (``disagg_*``) and the exposition toolkit.

Usage::

    registry = Registry()
    m = RouterMetrics(registry)
    m.requests.labels(route="remote", status="ok").inc()
    m.ttft.observe(0.120)
    body = registry.render()            # serve with CONTENT_TYPE at /metrics

The metric types (:class:`Counter`, :class:`Gauge`, :class:`Histogram`,
:class:`Registry`) and :func:`parse_prometheus_text` are re-exported from
:mod:`router.prom_registry` and :mod:`router.prom_text`, so
``from router.metrics import ...`` is all a caller needs. No dependency
beyond the standard library.
"""

from __future__ import annotations

from router.prom_registry import (  # noqa: F401  (re-exported API)
    Counter, CounterChild, Gauge, GaugeChild, Histogram, HistogramChild, Registry)
from router.prom_text import CONTENT_TYPE, parse_prometheus_text  # noqa: F401

ROUTES = ("local", "remote", "fallback")
"""Where a request's prefill ran: on the decode node, on a prefill node, or
locally after a remote attempt failed."""

REQUEST_STATUSES = ("ok", "error", "aborted")
"""How a request ended."""

ROLES = ("prefill", "decode")
"""Node roles."""

NODE_STATES = ("up", "down")
"""Node health states."""

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
"""Time to first token, 10 ms .. 60 s (seconds)."""

ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
"""Inter-token latency, 1 ms .. 10 s (seconds)."""

E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""End-to-end request latency, 50 ms .. 10 min (seconds)."""

OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                    0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Latency the router adds per hop, 0.1 ms .. 1 s (seconds)."""


class RouterMetrics:
    """Creates and registers every router metric; attributes are the metric families.

    The ``(route, status)`` request counters and ``(role, state)`` node gauges
    are created up front at 0, so ``rate()`` and dashboards see every series
    from the first scrape.
    """

    def __init__(self, registry: Registry) -> None:
        reg = registry.register
        self.requests: Counter = reg(Counter(
            "disagg_requests_total", "Finished requests by prefill route and outcome.",
            ("route", "status")))
        self.route_decisions: Counter = reg(Counter(
            "disagg_route_decisions_total",
            "Routing decisions by policy, chosen route and the policy's reason.",
            ("policy", "route", "reason")))
        self.ttft: Histogram = reg(Histogram(
            "disagg_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.", TTFT_BUCKETS))
        self.itl: Histogram = reg(Histogram(
            "disagg_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.", ITL_BUCKETS))
        self.e2e: Histogram = reg(Histogram(
            "disagg_e2e_request_latency_seconds",
            "Time from request arrival to its last token.", E2E_BUCKETS))
        self.kv_transfer_bytes: Counter = reg(Counter(
            "disagg_kv_transfer_bytes_total", "KV cache bytes moved from prefill to decode."))
        self.kv_transfer_seconds: Counter = reg(Counter(
            "disagg_kv_transfer_seconds_total", "Seconds spent moving KV cache blocks."))
        self.queue_depth: Gauge = reg(Gauge(
            "disagg_queue_depth", "Requests waiting or running on a node.", ("node", "role")))
        self.kv_usage: Gauge = reg(Gauge(
            "disagg_kv_usage_ratio", "Fraction of a node's KV cache blocks in use (0..1).",
            ("node", "role")))
        self.prompt_tokens: Counter = reg(Counter(
            "disagg_prompt_tokens_total", "Prompt tokens of admitted requests."))
        self.generation_tokens: Counter = reg(Counter(
            "disagg_generation_tokens_total", "Tokens generated and returned to clients."))
        self.http_errors: Counter = reg(Counter(
            "disagg_http_errors_total", "HTTP error responses by status code.", ("status",)))
        self.nodes: Gauge = reg(Gauge(
            "disagg_nodes", "Registered nodes by role and health.", ("role", "state")))
        self.fallbacks: Counter = reg(Counter(
            "disagg_fallbacks_total", "Remote prefills that fell back to local prefill.",
            ("reason",)))
        self.router_overhead: Histogram = reg(Histogram(
            "disagg_router_overhead_seconds",
            "Latency the router adds: ingress = HTTP arrival to the decode node receiving the "
            "request; egress = a token leaving the decode node to its bytes going to the client.",
            OVERHEAD_BUCKETS, ("direction",)))
        self.prefix_cached_tokens: Counter = reg(Counter(
            "disagg_decode_prefix_cached_tokens_total",
            "Prompt tokens of remote requests already cached on their decode node (not moved)."))
        self.calibration: Gauge = reg(Gauge(
            "disagg_cost_model_estimate", "The cost model's current calibrated estimates.",
            ("name", "role", "node")))
        for route in ROUTES:
            for status in REQUEST_STATUSES:
                self.requests.labels(route=route, status=status)
        for role in ROLES:
            for state in NODE_STATES:
                self.nodes.labels(role=role, state=state)

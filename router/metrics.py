"""The router's Prometheus metrics (``disagg_*``), built on ``prometheus_client``.

Usage::

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()      # one per app, never the global default
    m = RouterMetrics(registry)
    m.requests.labels(route="remote", status="ok").inc()
    m.ttft.observe(0.120)
    body = generate_latest(registry)    # serve with CONTENT_TYPE_LATEST at /metrics

Names, label names, help texts and bucket bounds are part of the contract with
dashboards (``deploy/grafana/disagg-dashboard.json``): change them only
together.

Several router workers on one host (``router --reuse-port``, ``disagg serve
--router-workers N``) share one ``/metrics`` through ``prometheus_client``'s
multiprocess mode: each worker is started with ``PROMETHEUS_MULTIPROC_DIR``
(:data:`MULTIPROC_DIR_ENV`) naming the same directory, empty before the first
one starts, so every counter and histogram update also lands in that worker's
file there, and :class:`WorkersView` serves the sum over every worker's file
from whichever worker answers. A worker that stopped leaves its counts in the
sum, so counters never go back when one is restarted.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""``prometheus_client``'s environment variable for multiprocess mode: the directory
where every router worker of one deployment keeps its counts (read at import)."""

ROUTES = ("local", "remote", "fallback")
"""Where a request's prefill ran: on the decode node, on a prefill node, or
locally after a remote attempt failed."""

REQUEST_STATUSES = ("ok", "error", "aborted")
"""How a request ended."""

ROLES = ("prefill", "decode")
"""Node roles."""

REJECT_REASONS = ("max_inflight", "predicted_ttft")
"""Why a request was refused with 429 before admission (``disagg_rejected_total``)."""

NODE_STATES = ("up", "draining", "down")
"""Node states: taking requests; registered but leaving (said ``Drain``, gets no new
requests); dropped (silent) and not back yet."""

NODE_HOLDINGS = (
    ("num_requests", "disagg_node_requests",
     "Requests a node's engine holds in any state (waiting, running, waiting for KV, pinned)."),
    ("num_used_blocks", "disagg_node_kv_blocks_used",
     "KV blocks held by requests on a node (free blocks kept for the prefix cache not counted)."),
    ("num_pinned", "disagg_node_pinned_requests",
     "Prefill-only requests whose KV blocks stay pinned until their send ends or is released."),
    ("num_kv_sends", "disagg_node_kv_sends",
     "Requests whose KV send has not ended on every rank (the transport still pins their "
     "source blocks)."),
)
"""Per-node held-work gauges: (heartbeat load key, metric name, help)."""

NODE_REGISTRATION = (
    ("tp", "disagg_node_tp", "Tensor-parallel degree of a node (its number of ranks)."),
    ("compute_units", "disagg_node_compute_units",
     "Compute units a node runs on over all its ranks: its GPUs when it reports any, else "
     "the CPU cores it may run on (its affinity after --cpus); 0 = not reported."),
    ("kv_capacity_tokens", "disagg_node_kv_capacity_tokens",
     "Tokens of KV cache a node holds (its KV blocks x block size)."),
    ("kv_bytes_per_token", "disagg_node_kv_bytes_per_token",
     "KV cache bytes of one token on a node, over all its ranks."),
)
"""Per-node gauges of what a node reported in its ``Register``: (key, metric name, help)."""

MIGRATION_FAILURES = ("max_migrations", "wait_timeout")
"""Why a lost decode node's request could not be moved (see ``router.migration``)."""

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


class Deferred:
    """A histogram (or histogram child) or counter whose updates wait until the event
    loop's running callback returns.

    One engine step's message makes the router write a chunk to every stream, one
    after another, in one callback; each stream's inter-token and egress
    observations and its token count are held here instead (an append, against
    ~1.5 us for one of ``prometheus_client``'s locked observations on an idle core
    here, more beside the engine), so the next stream's bytes go out sooner, and
    applied together in one callback scheduled for right after. Outside a running
    loop an update is applied at once. A scrape sees the values one loop turn
    late, never lost.
    """

    __slots__ = ("_metric", "_values", "_count", "_due_on")

    def __init__(self, metric) -> None:
        self._metric = metric
        self._values: list[float] = []     # observations not yet applied
        self._count = 0.0                  # increments not yet applied
        self._due_on = None                # the loop an apply is scheduled on

    def observe(self, value: float) -> None:
        """``metric.observe(value)``, soon."""
        self._values.append(value)
        self._schedule()

    def inc(self, amount: float = 1.0) -> None:
        """``metric.inc(amount)``, soon."""
        self._count += amount
        self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:               # no loop (a script, a test): now
            self.apply()
            return
        if self._due_on is not loop:       # none due, or due on a loop that ended first
            self._due_on = loop
            loop.call_soon(self.apply)

    def apply(self) -> None:
        """Apply every update held so far."""
        self._due_on = None
        values, self._values = self._values, []
        for value in values:
            self._metric.observe(value)
        if self._count:
            count, self._count = self._count, 0.0
            self._metric.inc(count)


NODE_COUNTERS = ("disagg_node_restarts", "disagg_kv_transfer_bytes")
"""Counters every router worker keeps alike, from every node's own registrations and
heartbeats (not from its own requests): with several workers they are shown from the
answering worker, since a sum would count each event once per worker."""


def shared_metrics_dir() -> Path | None:
    """The directory router workers share their counts in (:data:`MULTIPROC_DIR_ENV`), or
    None when unset (one router: its own registry is the whole story).

    Raises ValueError when it is set but not a directory (``prometheus_client`` would
    fail at the first metric with a bare FileNotFoundError)."""
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if not path:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_DIR_ENV}={path!r} is not a directory: create it (empty) "
                         "before starting the router workers that share it")
    return Path(path)


class WorkersView:
    """What ``/metrics`` shows when router workers share :func:`shared_metrics_dir`:
    the counters and histograms of requests summed over all workers' files, and this
    worker's own ``registry`` for the rest.

    From the answering worker, on purpose: the gauges and :data:`NODE_COUNTERS`. The
    node gauges (``disagg_nodes``, ``disagg_queue_depth``, what each node holds and
    registered with) and node counters are the same in every worker, which all get
    every node's messages; a node's series goes as soon as the node does (a
    multiprocess file cannot forget one). ``disagg_parked_requests`` and the cost
    model's gauges are the answering worker's own. Pass it where a registry is read
    (``generate_latest(view)``)."""

    def __init__(self, registry: CollectorRegistry, directory: Path) -> None:
        self.registry = registry
        self.directory = directory

    def collect(self):
        """The summed families from every worker's file, then this worker's own."""
        files = sorted(str(p) for pattern in ("counter_*.db", "histogram_*.db")
                       for p in self.directory.glob(pattern))
        for family in MultiProcessCollector.merge(files, accumulate=True):
            if family.name not in NODE_COUNTERS:
                yield family
        for family in self.registry.collect():
            if family.type == "gauge" or family.name in NODE_COUNTERS:
                yield family


class RouterMetrics:
    """Creates every router metric in ``registry``; attributes are the metric families.

    The ``(route, status)`` request counters, ``(role, state)`` node gauges,
    ``role`` restart counters and ``reason`` rejection counters are created up front at 0, so ``rate()`` and
    dashboards see every series from the first scrape. The per-token series
    (inter-token latency, egress, generated tokens) are updated through
    :class:`Deferred` wrappers, ``itl_soon``, ``egress_soon`` and
    ``generation_tokens_soon``, which the token path uses. Constructing it turns
    off ``prometheus_client``'s ``*_created`` timestamp series process-wide: no
    dashboard uses them, and in text format 0.0.4 Prometheus would store each
    as an extra gauge series per label set. Registering twice in one registry raises ValueError
    (duplicated timeseries).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        disable_created_metrics()
        kw = {"registry": registry}
        self.requests = Counter(
            "disagg_requests_total", "Finished requests by prefill route and outcome.",
            ("route", "status"), **kw)
        self.route_decisions = Counter(
            "disagg_route_decisions_total",
            "Routing decisions by policy, chosen route and the policy's reason.",
            ("policy", "route", "reason"), **kw)
        self.ttft = Histogram(
            "disagg_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            buckets=TTFT_BUCKETS, **kw)
        self.itl = Histogram(
            "disagg_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=ITL_BUCKETS, **kw)
        self.e2e = Histogram(
            "disagg_e2e_request_latency_seconds",
            "Time from request arrival to its last token.", buckets=E2E_BUCKETS, **kw)
        self.kv_transfer_bytes = Counter(
            "disagg_kv_transfer_bytes_total", "KV cache bytes moved from prefill to decode.",
            **kw)
        self.kv_transfer_seconds = Counter(
            "disagg_kv_transfer_seconds_total", "Seconds spent moving KV cache blocks.", **kw)
        self.queue_depth = Gauge(
            "disagg_queue_depth", "Requests waiting or running on a node.", ("node", "role"),
            **kw)
        self.kv_usage = Gauge(
            "disagg_kv_usage_ratio", "Fraction of a node's KV cache blocks in use (0..1).",
            ("node", "role"), **kw)
        self.prompt_tokens = Counter(
            "disagg_prompt_tokens_total", "Prompt tokens of admitted requests.", **kw)
        self.generation_tokens = Counter(
            "disagg_generation_tokens_total", "Tokens generated and returned to clients.", **kw)
        self.http_errors = Counter(
            "disagg_http_errors_total", "HTTP error responses by status code.", ("status",),
            **kw)
        self.nodes = Gauge(
            "disagg_nodes", "Registered nodes by role and health.", ("role", "state"), **kw)
        self.node_restarts = Counter(
            "disagg_node_restarts_total",
            "Times a node id registered again with a new process id (it was restarted).",
            ("role",), **kw)
        #: what each node's engine still holds (its last heartbeat), by the load key
        #: that feeds it: all 0 on an idle node, so after quiescence anything else is a leak
        self.node_holdings = {key: Gauge(name, doc, ("node", "role"), **kw)
                              for key, name, doc in NODE_HOLDINGS}
        #: what each registered node reported in its Register (shape, KV size)
        self.node_registration = {key: Gauge(name, doc, ("node", "role"), **kw)
                                  for key, name, doc in NODE_REGISTRATION}
        self.fallbacks = Counter(
            "disagg_fallbacks_total", "Remote prefills that fell back to local prefill.",
            ("reason",), **kw)
        self.rejected = Counter(
            "disagg_rejected_total",
            "Requests refused with HTTP 429 before admission: max_inflight = --max-inflight "
            "requests already in flight; predicted_ttft = predicted time to first token over "
            "--reject-ttft-slo-s.", ("reason",), **kw)
        self.migrations = Counter(
            "disagg_migrations_total",
            "Requests moved off a lost decode node (resumed elsewhere with the tokens already "
            "sent), by why the node was lost.", ("reason",), **kw)
        self.migration_failures = Counter(
            "disagg_migration_failures_total",
            "Requests a decode node's loss ended with an error: max_migrations = moved "
            "--max-migrations times already; wait_timeout = no decode node came up within "
            "--migration-wait-s.", ("reason",), **kw)
        self.parked_requests = Gauge(
            "disagg_parked_requests",
            "Requests of a lost decode node waiting for a decode node to come up.", **kw)
        self.router_overhead = Histogram(
            "disagg_router_overhead_seconds",
            "Latency the router adds: ingress = HTTP arrival to the decode node receiving the "
            "request; egress = a token leaving the decode node to its bytes going to the client.",
            ("direction",), buckets=OVERHEAD_BUCKETS, **kw)
        self.prefix_cached_tokens = Counter(
            "disagg_decode_prefix_cached_tokens_total",
            "Prompt tokens of remote requests already cached on their decode node (not moved).",
            **kw)
        self.calibration = Gauge(
            "disagg_cost_model_estimate", "The cost model's current calibrated estimates.",
            ("name", "role", "node"), **kw)
        self.calibration_observations = Gauge(
            "disagg_cost_model_observations",
            "Measurements behind each disagg_cost_model_estimate term (same name, role, node); "
            "a fit with few is still mostly its prior.", ("name", "role", "node"), **kw)
        #: the per-token updates, applied after the callback that delivers a step
        self.itl_soon = Deferred(self.itl)
        self.egress_soon = Deferred(self.router_overhead.labels(direction="egress"))
        self.generation_tokens_soon = Deferred(self.generation_tokens)
        for route in ROUTES:
            for status in REQUEST_STATUSES:
                self.requests.labels(route=route, status=status)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for reason in MIGRATION_FAILURES:
            self.migration_failures.labels(reason=reason)
        for role in ROLES:
            self.node_restarts.labels(role=role)
            for state in NODE_STATES:
                self.nodes.labels(role=role, state=state)

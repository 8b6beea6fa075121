"""A node's own observability: Prometheus metrics and Kubernetes health probes.

Every node process (prefill or decode) serves, on its own small HTTP port::

    GET /metrics   its engine's metrics (``disagg_engine_*``), from NodeMetrics.registry
    GET /readyz    200 once ready (model loaded, registered with a router), else 503
    GET /livez     200 while the engine loop makes progress (LoopWatch), else 503

Usage (one thread runs the loop; the HTTP server answers from its own threads)::

    metrics = NodeMetrics("decode", "decode-0", num_kv_blocks=engine.num_blocks)
    watch = LoopWatch(stall_s=60.0)                      # created when the loop starts
    http = NodeHTTPServer("0.0.0.0", 0, metrics.registry,
                          ready=lambda: (True, "") if registered else (False, "not registered"),
                          live=watch.live)
    http.start()                                         # http.port: the bound port
    while serving:
        watch.tick()
        t0 = time.perf_counter(); engine.step(); seconds = time.perf_counter() - t0
        metrics.observe_step(seconds, *engine.last_step_tokens)
        metrics.update(engine.load(), engine.kv_stats)
    http.close()

Names are ``disagg_engine_*`` so they never collide with the router's per-node
gauges (``disagg_node_*``, fed by heartbeats): a node's own series say what its
engine did, step by step; the router's say what it last heard. The node's role
and id are exported once, as ``disagg_engine_info{role, node_id} 1``, not as
labels on every series (the scrape target's labels already tell nodes apart).
Names, help texts and bucket bounds are a contract with dashboards: change
them only together.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               disable_created_metrics, make_wsgi_app)
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
"""Node roles."""

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Engine step time, 1 ms .. 60 s (seconds; a long prefill chunk on a CPU takes seconds)."""

PREFILL_TOKEN_BUCKETS = (0, 1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""Prompt tokens computed in one step (0 = a decode-only step)."""

BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Requests decoding one token in one step (the decode batch size; 0 = a prefill-only step)."""

LOAD_GAUGES = (
    ("queued_prefill_tokens", "disagg_engine_queued_prefill_tokens",
     "Prompt tokens waiting or still to compute (prefill work queued on this engine)."),
    ("num_waiting", "disagg_engine_waiting_requests",
     "Requests queued for admission (the queue depth)."),
    ("num_running", "disagg_engine_running_requests",
     "Requests admitted and computing (prefilling or decoding)."),
    ("num_waiting_for_kv", "disagg_engine_waiting_for_kv_requests",
     "Requests whose KV cache is being computed remotely or is still arriving."),
    ("num_pinned", "disagg_engine_pinned_requests",
     "Prefill-only requests whose KV blocks stay pinned until their send ends or is released."),
    ("num_kv_sends", "disagg_engine_kv_sends_in_flight",
     "Requests whose KV send has not ended on every rank."),
    ("num_requests", "disagg_engine_requests",
     "Requests the engine holds in any state (waiting, running, waiting for KV, pinned)."),
    ("num_used_blocks", "disagg_engine_kv_used_blocks",
     "KV blocks held by requests (free blocks kept for the prefix cache not counted)."),
    ("kv_usage", "disagg_engine_kv_usage_ratio",
     "Fraction of the engine's KV cache blocks held by requests (0..1)."),
)
"""Gauges set from the engine's ``load()``: (load key, metric name, help)."""

PREEMPTIONS_KEY = "num_preemptions"
"""The ``load()`` key holding the engine's running total of preemptions."""

KV_DIRECTIONS = (("sent", "bytes_sent"), ("received", "bytes_received"))
"""``direction`` label of ``disagg_engine_kv_transfer_bytes_total``, by ``kv_stats`` key."""


class NodeMetrics:
    """Every metric of one node's engine, in a registry of its own (``registry``).

    Feed it from the loop thread: ``observe_step`` after each engine step,
    ``update`` with the engine's ``load()`` and ``kv_stats`` whenever they may
    have moved. Serve ``registry`` (``NodeHTTPServer``, or ``generate_latest``).
    Constructing it turns off ``prometheus_client``'s ``*_created`` series
    process-wide, as the router's metrics do.

    Running totals the engine keeps (preemptions, KV bytes) become counters that
    advance by the difference since the last ``update``; a total that went down
    (the thing counting it restarted) counts as a reset from 0, as Prometheus's
    ``rate()`` treats one, so no counter ever goes backwards.
    """

    def __init__(self, role: str, node_id: str, *, num_kv_blocks: int) -> None:
        """``role``: ``"prefill"`` or ``"decode"``; ``node_id``: the id it registers under;
        ``num_kv_blocks``: its KV cache capacity (``engine.num_blocks``). Raises ValueError."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not node_id:
            raise ValueError("node_id must not be empty")
        if num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
        disable_created_metrics()
        self.registry = CollectorRegistry()
        kw = {"registry": self.registry}
        self.info = Info("disagg_engine", "This node's role and id (value always 1).", **kw)
        self.info.info({"role": role, "node_id": node_id})
        self.step_seconds = Histogram(
            "disagg_engine_step_seconds", "Wall time of one engine step (schedule, model, sample).",
            buckets=STEP_BUCKETS, **kw)
        self.step_prefill_tokens = Histogram(
            "disagg_engine_step_prefill_tokens", "Prompt tokens computed in one engine step.",
            buckets=PREFILL_TOKEN_BUCKETS, **kw)
        self.step_decode_requests = Histogram(
            "disagg_engine_step_decode_requests",
            "Requests decoding one token in one engine step (the decode batch size).",
            buckets=BATCH_BUCKETS, **kw)
        self.steps = Counter("disagg_engine_steps_total", "Engine steps observed.", **kw)
        self.prefill_tokens = Counter(
            "disagg_engine_prefill_tokens_total", "Prompt tokens computed (prefill).", **kw)
        self.decode_tokens = Counter(
            "disagg_engine_decode_tokens_total", "Tokens computed by decode steps.", **kw)
        self.preemptions = Counter(
            "disagg_engine_preemptions_total",
            "Running requests preempted for want of KV blocks (freed, recomputed later).", **kw)
        self.kv_transfer_bytes = Counter(
            "disagg_engine_kv_transfer_bytes_total",
            "KV cache bytes this node's transport moved, summed over its ranks: sent "
            "(prefill) or received (decode).", ("direction",), **kw)
        self.turn_wait_seconds = Counter(
            "disagg_engine_compute_turn_wait_seconds",
            "Seconds this node's steps waited for their turn at compute on cores it shares "
            "with another node (--compute-turns; stays 0 without turns).", **kw)
        self.turns_skipped = Counter(
            "disagg_engine_compute_turns_skipped",
            "Steps computed without their turn because the other node on these cores held "
            "it past --compute-turn-wait-s (stopped, hung or in a very long step).", **kw)
        self.kv_capacity_blocks = Gauge(
            "disagg_engine_kv_capacity_blocks", "KV cache blocks the engine has in all.", **kw)
        self.kv_capacity_blocks.set(num_kv_blocks)
        #: the gauges ``update`` sets, by the ``load()`` key that feeds each
        self.load_gauges = {key: Gauge(name, doc, **kw) for key, name, doc in LOAD_GAUGES}
        for direction, _ in KV_DIRECTIONS:
            self.kv_transfer_bytes.labels(direction=direction)
        self._totals: dict[str, float] = {}     # last running total seen, by source key

    def observe_step(self, seconds: float, prefill_tokens: int, decodes: int) -> None:
        """Record one engine step: it took ``seconds``, computed ``prefill_tokens``
        prompt tokens and one token for each of ``decodes`` requests (the engine's
        ``last_step_tokens``). A step that only polled KV transfers may be skipped.
        Raises ValueError on a negative argument."""
        if seconds < 0 or prefill_tokens < 0 or decodes < 0:
            raise ValueError(f"negative step figures: seconds={seconds}, "
                             f"prefill_tokens={prefill_tokens}, decodes={decodes}")
        self.step_seconds.observe(seconds)
        self.step_prefill_tokens.observe(prefill_tokens)
        self.step_decode_requests.observe(decodes)
        self.steps.inc()
        self.prefill_tokens.inc(prefill_tokens)
        self.decode_tokens.inc(decodes)

    def update(self, load: dict, kv_stats: dict, turn_wait_s: float = 0.0,
               turns_skipped: int = 0) -> None:
        """Set the gauges from the engine's ``load()`` (every key of ``LOAD_GAUGES``)
        and advance the counters from its running totals: ``load["num_preemptions"]``,
        ``kv_stats["bytes_sent"]`` / ``["bytes_received"]``, ``turn_wait_s`` and
        ``turns_skipped`` (the engine's ``compute_turns.waited_s`` and ``.skipped``).
        Raises KeyError if a key is missing (the engine's ``load()`` and ``kv_stats``
        always have them)."""
        for key, gauge in self.load_gauges.items():
            gauge.set(load[key])
        self._advance(self.preemptions, PREEMPTIONS_KEY, load[PREEMPTIONS_KEY])
        self._advance(self.turn_wait_seconds, "turn_wait_s", turn_wait_s)
        self._advance(self.turns_skipped, "turns_skipped", turns_skipped)
        for direction, key in KV_DIRECTIONS:
            self._advance(self.kv_transfer_bytes.labels(direction=direction), key, kv_stats[key])

    def _advance(self, counter, key: str, total: float) -> None:
        """Move ``counter`` by what running total ``total`` (source ``key``) gained."""
        last = self._totals.get(key, 0)
        self._totals[key] = total
        delta = total - last if total >= last else total     # went down: a reset from 0
        if delta > 0:
            counter.inc(delta)


Probe = Callable[[], tuple[bool, str]]
"""A health check: ``(True, "")`` when healthy, else ``(False, why)``."""


class LoopWatch:
    """Liveness from a loop's progress: live while its last ``tick`` is recent.

    The loop calls ``tick()`` every iteration (idle iterations too); ``live`` is
    a ``Probe`` for ``/livez``. One iteration holds one engine step, and on a CPU
    a step (a long prefill chunk, a big batch) can take seconds, so ``stall_s``
    must be generous, e.g. 60 s; a Kubernetes liveness probe restarts the pod
    when it fails. The watch counts as ticked when it is made: make it when the
    loop starts, after the model is loaded (or cover loading with a startup
    probe). Uses the monotonic clock; ``tick`` and ``live`` may run on
    different threads.
    """

    def __init__(self, stall_s: float = 60.0) -> None:
        """``stall_s``: seconds without a tick after which the loop counts as stalled
        (finite, > 0; else ValueError)."""
        if not (math.isfinite(stall_s) and stall_s > 0):
            raise ValueError(f"stall_s must be a finite number > 0, got {stall_s}")
        self.stall_s = stall_s
        self._last = time.monotonic()

    def tick(self, now: float | None = None) -> None:
        """The loop made progress (at ``now``, ``time.monotonic()`` by default)."""
        self._last = time.monotonic() if now is None else now

    def live(self, now: float | None = None) -> tuple[bool, str]:
        """``(True, "")`` if the last tick is at most ``stall_s`` old at ``now``
        (``time.monotonic()`` by default), else ``(False, why)``."""
        age = (time.monotonic() if now is None else now) - self._last
        if age > self.stall_s:
            return False, f"engine loop made no progress for {age:.1f} s (limit {self.stall_s:g} s)"
        return True, ""


class _QuietHandler(WSGIRequestHandler):
    """Logs requests at debug level instead of to stderr (probes come every few seconds)."""

    def log_message(self, format, *args) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class NodeHTTPServer:
    """``/metrics``, ``/readyz`` and ``/livez`` on a small threaded HTTP server.

    ``/metrics`` serves ``registry`` (``prometheus_client`` handles content
    negotiation and gzip). ``/readyz`` and ``/livez`` call ``ready`` / ``live``
    (``Probe``: ``() -> (ok, reason)``) on every request and answer 200
    ``{"status": "ready"}`` / ``{"status": "live"}``, or 503 ``{"status": "not
    ready", "reason": ...}`` / ``{"status": "not live", ...}``; a probe that
    raises (or returns something else) answers 503 with the error as the
    reason. Other paths: 404; other methods on the probe paths: 405. Probes run
    on the server's threads, so they must be thread-safe and quick.

    ``start()`` binds (``port`` 0: a free port; ``.port`` is the bound one) and
    serves from a daemon thread; ``close()`` stops, frees the port and joins
    the thread (idempotent). Also a context manager (start, close).
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: Probe, live: Probe) -> None:
        """Nothing is bound until ``start()``. Raises ValueError on a bad port."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.host = host
        self.port = port
        self._metrics_app = make_wsgi_app(registry)
        self._probes = {"/readyz": ("ready", ready), "/livez": ("live", live)}
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> NodeHTTPServer:
        """Bind and serve in a daemon thread; returns self. Raises RuntimeError if
        started or closed already, OSError if the address cannot be bound."""
        if self._server is not None or self._closed:
            raise RuntimeError("NodeHTTPServer can be started once")
        server_cls = ThreadingWSGIServer
        if ":" in self.host:                    # an IPv6 address
            server_cls = type("ThreadingWSGIServerV6", (ThreadingWSGIServer,),
                              {"address_family": socket.AF_INET6})
        self._server = make_server(self.host, self.port, self._app, server_class=server_cls,
                                   handler_class=_QuietHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.1}, daemon=True, name=f"node-http:{self.port}")
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, free the port and join the thread (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._server is None:
            return
        self._server.shutdown()                 # serve_forever returns
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> NodeHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _app(self, environ, start_response):
        """The WSGI app: route by path."""
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path not in self._probes:
            return _json(start_response, "404 Not Found", {"error": f"no such path: {path}"})
        if environ["REQUEST_METHOD"] != "GET":
            return _json(start_response, "405 Method Not Allowed", {"error": "use GET"},
                         [("Allow", "GET")])
        word, probe = self._probes[path]
        try:
            ok, reason = probe()
        except Exception as exc:                # a broken probe fails the check, not the server
            log.warning("%s probe raised %r", word, exc)
            ok, reason = False, f"{word} probe raised {type(exc).__name__}: {exc}"
        if ok:
            return _json(start_response, "200 OK", {"status": word})
        return _json(start_response, "503 Service Unavailable",
                     {"status": f"not {word}", "reason": str(reason)})


def _json(start_response, status: str, body: dict, headers: list | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), ("Cache-Control", "no-store"),
                            *(headers or [])])
    return [data]

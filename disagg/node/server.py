"""The node process loop, the same for both roles.

One thread, one engine, one DEALER socket per router (``router_links``: ``--router``
may name several routers, or a DNS name standing for all of them) and, once
registered, an uplink to each router that offers one, which carries everything the
node sends but ``Register`` and heartbeats, and, once the router said
``DownlinkSwitch``, everything the router sends (``disagg.node.uplink``)::

    loop:  poll the routers' control sockets and uplinks (no wait while the engine has work)
           → role handler: each message   (Generate / Prefill / FirstToken / Abort …)
           → engine.step() while it has work, timed; while its model runs (on the
             engine's model thread) this thread keeps receiving: a new request's
             Generate / Prefill is admitted at once (a remote one's KVTarget leaves
             then), anything that may free blocks waits for the step's end, in order
           → role handler: outputs and KV events → messages to the router

    heartbeat thread (``disagg.node.heartbeats``, own socket per router): Heartbeat
    every heartbeat_s with the loop's latest load, step timings and KV byte counters —
    so a node stays "alive" through a long step (a CPU prefill chunk can take seconds)

The role (what a message means, what an output becomes) lives in a
:class:`RoleHandler`: ``prefill_node.handler`` and ``decode_node.handler``.
A node registers with each router at start, answers ``RegisterAgain`` by registering
again (the router restarted or dropped it), and keeps serving whatever happens to a
router: requests it no longer knows are aborted by it when their tokens arrive. A
``RegisterAgain`` while registered means that router dropped the node (it was silent
too long: its requests were already moved or ended), and ``Registered`` carries the
router process's id, which changes when the router restarted: either way nobody waits
for the requests that router sent, so the node aborts them (blocks and pins freed) and
forgets their role state. Each router keeps its own node table; the others' requests
run on.

Leaving (``run(stop, drain)``): once ``drain`` is set (a node's first SIGTERM)
the node sends ``Drain`` (to every router), refuses new ``Generate`` / ``Prefill`` with
``Rejected(DRAINING)`` (the router routes them elsewhere), and serves what it
holds (remote KV it waits for included) until its engine is idle or
``drain_timeout_s`` passed; then, as on ``stop``, it sends ``Deregister`` (the
router recovers whatever it still held) and returns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod

import zmq

from disagg.control import messages as m
from disagg.engine import LLMEngine
from disagg.engine.model_runner import kv_block_bytes
from disagg.engine.outputs import KVTransferEvent, RequestOutput
from disagg.node.heartbeats import Heartbeats
from disagg.node.observability import LoopWatch, NodeMetrics
from disagg.node.router_links import RouterLink, RouterLinks

log = logging.getLogger("disagg.node")

LEAVE_LINGER_MS = 1000      # how long closing waits for queued messages to reach the router


class RoleHandler(ABC):
    """What a node of one role does with control messages and engine outputs.

    ``send`` queues a message to the router; ``engine`` is the node's engine.
    """

    role = "abstract"

    def __init__(self, engine: LLMEngine, send) -> None:
        self.engine = engine
        self.send = send

    @abstractmethod
    def on_message(self, msg) -> None:
        """Act on one message from the router."""

    @abstractmethod
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Report one engine step's outputs."""

    def on_kv_event(self, event: KVTransferEvent) -> None:
        """A KV transfer ended (no-op by default)."""

    def forget(self, rid: str) -> None:
        """Drop what this handler keeps about ``rid`` (aborted by the node; no-op by
        default)."""


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """KV bytes one token takes over all of ``engine``'s ranks."""
    cfg = engine.config
    return kv_block_bytes(engine.model_config, cfg) * cfg.tensor_parallel_size // cfg.block_size


class NodeServer:
    """Runs ``handler``'s engine for the routers ``routers`` names (``--router``: one
    address, a comma-separated list, or DNS names re-resolved every ``resolve_s``)
    until stopped. ``metrics`` (optional) gets every step's timing and the engine's
    load; ``watch`` (optional) is ticked on every turn of the loop (liveness)."""

    def __init__(self, engine: LLMEngine, handler_cls, routers: str, node_id: str,
                 served_model_name: str, heartbeat_s: float = 0.5,
                 drain_timeout_s: float = 30.0, resolve_s: float = 10.0,
                 metrics: NodeMetrics | None = None, watch: LoopWatch | None = None) -> None:
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        if not drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s!r}")
        self.engine = engine
        self.node_id = node_id
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.metrics, self.watch = metrics, watch
        self.ctx = zmq.Context()
        self.links = RouterLinks(self.ctx, node_id, routers, resolve_s)
        self.handler: RoleHandler = handler_cls(engine, self.send)
        self._deferred: list[tuple[RouterLink, object]] = []   # received during a step
        self._wake_r, self._wake_w = os.pipe()   # the model thread's "step done" signal
        os.set_blocking(self._wake_r, False)
        self.beats = Heartbeats(self.ctx, node_id, heartbeat_s, self.links.addresses,
                                engine.load())
        cfg = engine.config
        from disagg.cpus import compute_report   # after any --cpus pinning (run_node)
        self._register = m.Register(
            node_id=node_id, role=handler_cls.role, tp=cfg.tensor_parallel_size,
            block_size=cfg.block_size, model=served_model_name,
            max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
            num_kv_blocks=engine.num_blocks, kv_bytes_per_token=kv_bytes_per_token(engine),
            kv_transport=cfg.kv_transfer.kind if cfg.kv_transfer else "none",
            kv_endpoints=list(engine.executor.kv_endpoints), pid=os.getpid(),
            host=socket.gethostname(),
            **compute_report(cfg.device, cfg.tensor_parallel_size))

    @property
    def registered(self) -> bool:
        """Whether a router answered this node's Register."""
        return self.links.any_registered()

    def ready(self) -> tuple[bool, str]:
        """The readiness probe: registered with a router and not draining."""
        if self.draining:
            return False, "draining: taking no new requests"
        if not self.registered:
            return False, "not registered with any router yet"
        return True, ""

    def send(self, msg) -> None:
        """Queue ``msg`` (never blocks; ZeroMQ buffers while a router is away): a
        request's messages to the router that sent the request, a ``StepTokens`` split
        per router, the rest (``Drain``, ``Deregister``) to every router."""
        links = self.links
        if isinstance(msg, m.StepTokens) and len(links.links) > 1:
            per: dict[RouterLink | None, list[m.Tokens]] = {}
            for item in msg.items:
                per.setdefault(links.owner(item.rid), []).append(item)
            for link, items in per.items():
                self._send_to(link, m.StepTokens(items), items[0].rid)
            return
        rid = getattr(msg, "rid", None)
        if rid is None:
            for link in list(links.links.values()):
                self._send_to(link, msg, None)
        else:
            self._send_to(links.owner(rid), msg, rid)

    def _send_to(self, link: RouterLink | None, msg, rid: str | None) -> None:
        if link is None:
            log.warning("no router owns request %s (gone?); dropped %s", rid,
                        type(msg).__name__)
        elif not link.send(m.encode(msg)):
            log.warning("control queue to router %s is full; dropped %s", link.address,
                        type(msg).__name__)

    def _send_register(self, link: RouterLink) -> None:
        link.register_sent_at = time.monotonic()
        link.send_control(m.encode(self._register))    # never the uplink: router.connections

    def _sync_links(self) -> None:
        """Apply the latest router lookup: register with new routers, forget gone ones."""
        opened, removed = self.links.sync()
        for link in removed:
            self._abort_owned(link, link.router_id, f"router {link.address} is gone")
            link.close()
        for link in opened:
            self._send_register(link)

    def run(self, stop: threading.Event, drain: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set, or until a drain begun by setting ``drain``
        ended (see the module docstring); either way say ``Deregister`` last."""
        poller = self.links.poller
        self._sync_links()
        self.beats.start(stop)
        deadline = None
        try:
            while not stop.is_set():
                if self.watch is not None:
                    self.watch.tick()
                if drain is not None and drain.is_set():
                    if deadline is None:
                        deadline = self._begin_drain()
                    if self.engine.is_idle() or time.monotonic() >= deadline:
                        self._end_drain(deadline)
                        break
                self._sync_links()
                for link in list(self.links.links.values()):
                    link.tend_uplink(self.node_id)
                moved = bool(self._deferred)
                self._handle_deferred()
                ready = dict(poller.poll(0 if self.engine.has_unfinished() else 50))
                moved = moved or bool(ready)
                for link, msg in self._received(ready):
                    self._dispatch(link, msg)
                if self.engine.has_unfinished():
                    self._step()
                    moved = True
                if moved:
                    stats, load = self.engine.kv_stats, self.engine.load()
                    self.beats.update(load, stats["bytes_sent"], stats["bytes_received"])
                    if self.metrics is not None:
                        turns = self.engine.executor.compute_turns
                        self.metrics.update(load, stats, turns.waited_s if turns else 0.0,
                                            turns.skipped if turns else 0)
        finally:
            self.send(m.Deregister(self.node_id))      # the router recovers what is left
            stop.set()
            self.beats.join()

    def _begin_drain(self) -> float:
        """Say ``Drain``; return when the grace period ends."""
        self.draining = True
        self.send(m.Drain(self.node_id))
        held = self.engine.load()["num_requests"]
        log.info("draining: %d request(s) held; leaving when they are done or in %g s",
                 held, self.drain_timeout_s)
        return time.monotonic() + self.drain_timeout_s

    def _end_drain(self, deadline: float) -> None:
        held = self.engine.load()["num_requests"]
        if held:
            log.warning("drain grace period over with %d request(s) still held; leaving "
                        "them to the router", held)
        else:
            log.info("drained: nothing left, %.1f s before the grace period's end",
                     max(deadline - time.monotonic(), 0.0))

    def _router_changed(self, link: RouterLink, router_id: str) -> None:
        """A new router process answered on ``link``: drop the old one's requests."""
        if router_id and link.router_id and router_id != link.router_id:
            self._abort_owned(link, link.router_id,
                              f"router {link.address} restarted ({link.router_id} -> "
                              f"{router_id})")
        if router_id:
            link.router_id = router_id

    def _abort_owned(self, link: RouterLink, router_id: str, why: str) -> None:
        """Abort every request ``link``'s router sent while its id was ``router_id``
        (all of them when it is the node's only router) and forget their role state."""
        match = self.links.owned_by(link, router_id)
        aborted = self.engine.abort_all(match)
        if match is None:
            self.handler = type(self.handler)(self.engine, self.send)
        else:
            for rid in aborted:
                self.handler.forget(rid)
        if aborted or match is None:
            log.warning("%s: aborted the %d request(s) it sent here", why, len(aborted))

    def _received(self, ready: dict):
        """``(link, message)`` for every message waiting on the links ``ready`` (a
        poll's result) names, in the order the router sent them: its control socket's
        up to its ``DownlinkSwitch``, then what the uplink brought (decoded; malformed
        frames dropped). An uplink that ended is closed."""
        for link in list(self.links.links.values()):
            frames = link.check_uplink(ready)
            while link.sock in ready:
                try:
                    frame = link.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                for msg in _decoded([frame]):
                    if isinstance(msg, m.DownlinkSwitch):
                        yield from ((link, held) for held in _decoded(link.downlink_switch(msg)))
                    else:
                        yield link, msg
            yield from ((link, msg) for msg in _decoded(frames))

    def _admits_during_step(self, msg) -> bool:
        """Whether ``msg`` can be handled while the model runs: a request new to the
        engine (admitting frees no block; a re-sent one replaces its copy, which does)."""
        return isinstance(msg, (m.Generate, m.Prefill)) \
            and msg.rid not in self.engine.scheduler.requests

    def _overlap(self, future) -> None:
        """While a step's model runs: receive, admit new requests at once, keep the rest
        (and everything after the first kept message, so order holds) for the step's
        end. Returns when the model is done."""
        future.add_done_callback(lambda _: os.write(self._wake_w, b"x"))
        poller = self.links.poller
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not future.done():
                ready = dict(poller.poll(1000))
                for link, msg in self._received(ready):
                    if not self._deferred and self._admits_during_step(msg):
                        self._dispatch(link, msg)
                    else:
                        self._deferred.append((link, msg))
                if self._wake_r in ready:
                    os.read(self._wake_r, 64)
        finally:
            poller.unregister(self._wake_r)

    def _handle_deferred(self) -> None:
        """Handle, in arrival order, what came during the last step and had to wait."""
        deferred, self._deferred = self._deferred, []
        for link, msg in deferred:
            if self.links.links.get(link.address) is link:     # its router is still known
                self._dispatch(link, msg)

    def _dispatch(self, link: RouterLink, msg) -> None:
        """Act on one message from ``link``'s router."""
        if isinstance(msg, m.Registered):
            if not link.registered:
                log.info("registered with router %s as %s", link.address, self.node_id)
                if self.draining:                  # a new router: tell it too
                    link.send(m.encode(m.Drain(self.node_id)))
            link.registered = True
            if msg.router_id != link.router_id:
                link.close_uplink()                # it led to the router's previous process
            self._router_changed(link, msg.router_id)
            link.open_uplink(msg.uplink_port, self.node_id)
        elif self.draining and isinstance(msg, (m.Generate, m.Prefill)):
            log.info("refused %s: draining (the router routes it elsewhere)", msg.rid)
            self.send(m.Rejected(msg.rid, m.DRAINING))
        elif isinstance(msg, m.UplinkReady):
            link.confirm_uplink(self.node_id, msg.pid)
        elif isinstance(msg, m.Refused):
            raise RuntimeError(f"the router refused this node: {msg.reason}")
        elif isinstance(msg, m.RegisterAgain):
            if link.registered:
                # the router dropped this node (silent too long, or it restarted): it
                # already moved or ended every request it sent here; nobody reads them
                self._abort_owned(link, link.router_id,
                                  f"router {link.address} dropped this node")
                link.register_sent_at = 0.0
            # one Register per burst: heartbeats sent while we were busy each got a reply
            if time.monotonic() - link.register_sent_at > 2 * self.heartbeat_s:
                log.warning("router %s does not know this node; registering again",
                            link.address)
                link.registered = False
                self._send_register(link)
        else:
            self.handler.on_message(msg)

    def _step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.engine.step(overlap=self._overlap)
        seconds = time.perf_counter() - t0
        prefill_tokens, decodes = self.engine.last_step_tokens
        if prefill_tokens or decodes:
            if self.metrics is not None:
                self.metrics.observe_step(seconds, prefill_tokens, decodes)
            self.beats.record_step(prefill_tokens, decodes, seconds)
        if outputs:
            self.handler.on_outputs(outputs)
        for event in self.engine.pop_kv_events():
            self.handler.on_kv_event(event)

    def close(self) -> None:
        """Close the sockets (waiting up to ``LEAVE_LINGER_MS`` for the last messages,
        ``Deregister`` among them, to leave) and stop the engine (idempotent)."""
        self.links.close(LEAVE_LINGER_MS)
        self.ctx.term()
        self.engine.shutdown()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass                          # closed already (close() called twice)


def _decoded(frames: list[bytes]):
    """The messages in ``frames``, in order; a malformed frame is logged and skipped."""
    for frame in frames:
        try:
            yield m.decode(frame)
        except m.ControlError as exc:
            log.error("dropped a malformed control frame: %s", exc)

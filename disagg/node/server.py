"""The node process loop, the same for both roles.

One thread, one engine, one DEALER socket to the router::

    loop:  poll the control socket (no wait while the engine has work)
           → role handler: each message   (Generate / Prefill / FirstToken / Abort …)
           → engine.step() while it has work, timed
           → role handler: outputs and KV events → messages to the router

    heartbeat thread (own socket): Heartbeat every heartbeat_s with the loop's
    latest load, step timings and KV byte counters — so a node stays "alive"
    through a long step (a CPU prefill chunk can take seconds)

The role (what a message means, what an output becomes) lives in a
:class:`RoleHandler`: ``prefill_node.handler`` and ``decode_node.handler``.
A node registers at start, answers ``RegisterAgain`` by registering again
(the router restarted or dropped it), and keeps serving whatever happens to
the router: requests it no longer knows are aborted by it when their tokens
arrive. A ``RegisterAgain`` while registered means the router dropped the node
(it was silent too long: its requests were already moved or ended), and
``Registered`` carries the router process's id, which changes when the router
restarted: either way nobody waits for the requests the node holds, so it
aborts them all (blocks and pins freed) and forgets its role state.

Leaving (``run(stop, drain)``): once ``drain`` is set (a node's first SIGTERM)
the node sends ``Drain``, refuses new ``Generate`` / ``Prefill`` with
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

log = logging.getLogger("disagg.node")

MAX_STEP_SAMPLES = 64       # step timings carried by one heartbeat (the newest)
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


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """KV bytes one token takes over all of ``engine``'s ranks."""
    cfg = engine.config
    return kv_block_bytes(engine.model_config, cfg) * cfg.tensor_parallel_size // cfg.block_size


class NodeServer:
    """Runs ``handler``'s engine against the router at ``router_address`` until stopped."""

    def __init__(self, engine: LLMEngine, handler_cls, router_address: str, node_id: str,
                 served_model_name: str, heartbeat_s: float = 0.5,
                 drain_timeout_s: float = 30.0) -> None:
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        if not drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s!r}")
        self.engine = engine
        self.node_id = node_id
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        #: the id of the router process this node registered with ("" before the first)
        self.router_id = ""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(router_address)
        self.router_address = router_address
        self.handler: RoleHandler = handler_cls(engine, self.send)
        self.registered = False
        self._register_sent_at = 0.0
        self._lock = threading.Lock()        # guards the snapshot the heartbeat thread sends
        self._steps: list[list] = []
        self._snapshot = (engine.load(), 0, 0)
        cfg = engine.config
        from disagg.cpus import compute_report   # after any --cpus pinning (run_node)
        self._register = m.Register(
            node_id=node_id, role=handler_cls.role, tp=cfg.tensor_parallel_size,
            block_size=cfg.block_size, model=served_model_name,
            max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
            num_kv_blocks=engine.num_blocks, kv_bytes_per_token=kv_bytes_per_token(engine),
            kv_transport=cfg.kv_transfer.kind if cfg.kv_transfer else "none",
            kv_endpoints=list(engine.kv_endpoints), pid=os.getpid(), host=socket.gethostname(),
            **compute_report(cfg.device, cfg.tensor_parallel_size))

    def send(self, msg) -> None:
        """Queue ``msg`` to the router (never blocks; ZeroMQ buffers while it is away)."""
        try:
            self.sock.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control queue to the router is full; dropped %s", type(msg).__name__)

    def _send_register(self) -> None:
        self._register_sent_at = time.monotonic()
        self.send(self._register)

    def run(self, stop: threading.Event, drain: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set, or until a drain begun by setting ``drain``
        ended (see the module docstring); either way say ``Deregister`` last."""
        self._send_register()
        beats = threading.Thread(target=self._heartbeats, args=(stop,), daemon=True,
                                 name="heartbeat")
        beats.start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        deadline = None
        try:
            while not stop.is_set():
                if drain is not None and drain.is_set():
                    if deadline is None:
                        deadline = self._begin_drain()
                    if self.engine.is_idle() or time.monotonic() >= deadline:
                        self._end_drain(deadline)
                        break
                moved = bool(poller.poll(0 if self.engine.has_unfinished() else 50))
                if moved:
                    self._drain()
                if self.engine.has_unfinished():
                    self._step()
                    moved = True
                if moved:
                    stats = self.engine.kv_stats
                    self._snapshot = (self.engine.load(), stats["bytes_sent"],
                                      stats["bytes_received"])
        finally:
            self.send(m.Deregister(self.node_id))      # the router recovers what is left
            stop.set()
            beats.join()

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

    def _router_changed(self, router_id: str) -> None:
        """A new router process registered this node: drop the old one's requests."""
        if router_id and self.router_id and router_id != self.router_id:
            self._abort_everything(f"the router restarted ({self.router_id} -> {router_id})")
        if router_id:
            self.router_id = router_id

    def _abort_everything(self, why: str) -> None:
        """Abort every request the engine holds and forget the role's state."""
        aborted = self.engine.abort_all()
        self.handler = type(self.handler)(self.engine, self.send)
        log.warning("%s: aborted the %d request(s) held here", why, aborted)

    def _drain(self) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = m.decode(frame)
            except m.ControlError as exc:
                log.error("dropped a malformed control frame: %s", exc)
                continue
            if isinstance(msg, m.Registered):
                if not self.registered:
                    log.info("registered with the router as %s", self.node_id)
                    if self.draining:                  # a new router: tell it too
                        self.send(m.Drain(self.node_id))
                self.registered = True
                self._router_changed(msg.router_id)
            elif self.draining and isinstance(msg, (m.Generate, m.Prefill)):
                log.info("refused %s: draining (the router routes it elsewhere)", msg.rid)
                self.send(m.Rejected(msg.rid, m.DRAINING))
            elif isinstance(msg, m.Refused):
                raise RuntimeError(f"the router refused this node: {msg.reason}")
            elif isinstance(msg, m.RegisterAgain):
                if self.registered:
                    # the router dropped this node (silent too long, or it restarted): it
                    # already moved or ended every request held here, so nobody reads them
                    self._abort_everything("the router dropped this node")
                    self._register_sent_at = 0.0
                # one Register per burst: heartbeats sent while we were busy each got a reply
                if time.monotonic() - self._register_sent_at > 2 * self.heartbeat_s:
                    log.warning("the router does not know this node; registering again")
                    self.registered = False
                    self._send_register()
            else:
                self.handler.on_message(msg)

    def _step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - t0
        prefill_tokens, decodes = self.engine.last_step_tokens
        if prefill_tokens or decodes:
            with self._lock:
                self._steps.append([prefill_tokens, decodes, seconds])
                del self._steps[:-MAX_STEP_SAMPLES]
        if outputs:
            self.handler.on_outputs(outputs)
        for event in self.engine.pop_kv_events():
            self.handler.on_kv_event(event)

    def _heartbeats(self, stop: threading.Event) -> None:
        """Heartbeat thread: its own DEALER (``hb:`` + node id), the loop's latest snapshot."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"hb:{self.node_id}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.router_address)
        try:
            while not stop.wait(self.heartbeat_s):
                with self._lock:
                    steps, self._steps = self._steps, []
                load, sent, received = self._snapshot
                try:
                    sock.send(m.encode(m.Heartbeat(self.node_id, load, steps, sent, received)),
                              zmq.NOBLOCK)
                except zmq.Again:
                    pass                     # the router is away; the next beat will do
        finally:
            sock.close(0)

    def close(self) -> None:
        """Close the socket (waiting up to ``LEAVE_LINGER_MS`` for the last messages,
        ``Deregister`` among them, to leave) and stop the engine (idempotent)."""
        self.sock.close(LEAVE_LINGER_MS)
        self.ctx.term()
        self.engine.shutdown()

"""The router's control plane: nodes in, requests out, tokens back.

One ZeroMQ ROUTER socket (bound on ``control_address``) on the HTTP server's
event loop, and beside it a TCP listener for the nodes' uplinks, which carry
what a registered node sends (:mod:`router.uplinks`). Every request is an
:class:`Inflight` whose events (tokens, the end, an error) reach its HTTP
handler through an ``asyncio.Queue``; the flows and messages are drawn in
:mod:`disagg.control.messages`. Failures:

- prefill node silent for ``node_timeout_s``, its KV send failed, or it
  refused the request → ``Fallback`` to the decode node (counted by reason);
- decode node lost (its connection ended: at once, see
  :mod:`router.connections`; silent for ``node_timeout_s``; restarted) → the
  request moves to another decode node with the tokens already sent, or
  waits for one to come up (:mod:`router.migration`);
- client gone → ``Abort`` to every node holding the request.

Routing (decode node by load and prefix affinity, prefill node by load, local
vs remote by the policy) is in :meth:`Dispatcher.submit`; the messages'
handlers are in :class:`router.control_handlers.ControlHandlers`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from disagg.control import messages as m
from router.connections import ConnectionWatch
from router.admission import TTFTAdmission
from router.control_handlers import ControlHandlers
from router.inflight import Event, Inflight
from disagg.kv_cache.hashing import hash_blocks
from disagg.sampling_params import SamplingParams
from router.metrics import RouterMetrics
from router.migration import MigrationConfig, Migrator
from router.nodes import NodeRegistry
from router.policy import RoutingPolicy
from router.errors import ProtocolError
from router.route_types import Decision, RouteInput
from router.uplinks import Uplinks

log = logging.getLogger("disagg.router")


class Dispatcher:
    """Owns the control socket, the in-flight requests and the routing decision."""

    def __init__(self, registry: NodeRegistry, policy: RoutingPolicy, metrics: RouterMetrics,
                 control_address: str, migration: MigrationConfig | None = None,
                 reject_ttft_slo_s: float | None = None, uplink_port: int | None = 0) -> None:
        """``uplink_port``: where the uplink listener binds, on the control address's
        host (0: a free port; None: no uplinks, nodes send everything on the control
        socket; an ``ipc://`` control address has none and refuses a port > 0)."""
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        #: early rejection of requests predicted to miss the TTFT SLO (None: off)
        self.admission = TTFTAdmission(reject_ttft_slo_s, policy, metrics)
        self.inflight: dict[str, Inflight] = {}
        self.lost: dict[str, str] = {}          # node id → role, dropped and not back yet
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a node restarted under the same id takes its identity over from a connection
        # the router still holds (else its Register would wait unread until that closes)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind(control_address)
        #: the bound control address (a ``:*`` port resolved)
        self.address: str = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        #: this router process's id, in every ``Registered``: a node seeing it change
        #: knows its router restarted and drops the old one's requests
        self.router_id: str = uuid.uuid4().hex
        self.handlers = ControlHandlers(self)
        self.migrator = Migrator(self, migration or MigrationConfig())
        self.connections = ConnectionWatch(self.sock, self._disconnected)
        self.uplinks: Uplinks | None = None
        if uplink_port is not None:
            host = urlsplit(self.address).hostname if self.address.startswith("tcp://") \
                else None
            if host is not None:
                self.uplinks = Uplinks(host, uplink_port, self.handle, self._uplink_hello,
                                       self._uplink_lost, self._downlink_switch)
            elif uplink_port:
                raise ValueError(f"an uplink port needs a tcp:// control address, not "
                                 f"{self.address}")

    @property
    def uplink_port(self) -> int:
        """The uplink listener's port, as ``Registered`` tells nodes (0: none)."""
        return self.uplinks.port if self.uplinks is not None else 0

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Start receiving and watching node health (call on the serving loop)."""
        self._tasks = [asyncio.create_task(self._recv_loop()),
                       asyncio.create_task(self._health_loop()),
                       asyncio.create_task(self.connections.run())]
        if self.uplinks is not None:
            self._tasks.append(asyncio.create_task(self.uplinks.serve()))

    async def close(self) -> None:
        """Stop the tasks and close the socket."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.uplinks is not None:
            self.uplinks.close()
        self.connections.close()
        self.sock.close(0)
        self.ctx.term()

    async def _recv_loop(self) -> None:
        while True:
            try:
                ident, part = await self.sock.recv_multipart(copy=False)
            except ValueError:
                log.error("dropped a control message that was not [identity, frame]")
                continue
            ident, frame = ident.bytes, part.bytes
            try:
                msg = m.decode(frame)
            except m.ControlError as exc:
                log.error("dropped a malformed control frame from %r: %s", ident, exc)
                continue
            node_id = ident.decode(errors="replace")
            if isinstance(msg, m.Register):     # its connection: see router.connections
                self.connections.note(node_id, part.get(zmq.SRCFD))
            self.handle(node_id, msg, frame)

    def handle(self, node_id: str, msg, frame: bytes) -> None:
        """One message from ``node_id``, from its control socket or its uplink."""
        try:
            self.handlers.handle(node_id, msg, frame)
        except Exception:                # a bug in one handler must not stop the router
            log.exception("error handling %s", type(msg).__name__)

    async def _health_loop(self) -> None:
        period = self.registry.node_timeout_s / 4
        last = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stalled, last = now - last - period, now
            if stalled > self.registry.node_timeout_s / 2:
                # the router itself did not run (SIGSTOP, a paused VM, a blocked loop): it
                # heard nobody meanwhile, which says nothing of the nodes; their queued
                # heartbeats arrive now
                log.warning("the router did not run for %.1f s; not counting that against "
                            "the nodes' heartbeats", stalled)
                self.registry.excuse(stalled)
            for node in self.registry.expire(time.monotonic()):
                log.warning("node %s (%s) stopped answering; dropped", node.node_id, node.info.role)
                self.node_lost(node, "node_timeout")
            self.migrator.expire(time.monotonic())
            self.handlers.update_node_gauges()

    def _disconnected(self, node_id: str) -> None:
        """A registered node's connection ended (its process died): it is lost now."""
        node = self.registry.remove(node_id)
        if node is not None:
            log.warning("node %s (%s) disconnected; dropped", node_id, node.info.role)
            self.node_lost(node, "disconnected")

    def _uplink_hello(self, node_id: str, pid: int) -> None:
        """An uplink of ``node_id``'s process ``pid`` said hello: confirm it to the node."""
        self.send(node_id, m.UplinkReady(node_id, pid))

    def _downlink_switch(self, node_id: str, port: int) -> None:
        """The last message to ``node_id`` on the control socket: the rest take its uplink
        (the connection from its ``port``; not written to before this returns)."""
        self.send(node_id, m.DownlinkSwitch(node_id, port))

    def _uplink_lost(self, node_id: str, pid: int) -> None:
        """The uplink of ``node_id``'s process ``pid`` ended: lost, if still registered."""
        node = self.registry.nodes.get(node_id)
        if node is not None and node.info.pid == pid:
            self._disconnected(node_id)

    # ---- sending ---------------------------------------------------------
    def send(self, node_id: str, msg, frame: bytes | None = None) -> bool:
        """Send ``msg`` (or its already-encoded ``frame``) to ``node_id``, on its uplink when
        the node reads one (``router.uplinks``), else on the control socket; False if
        unreachable."""
        frame = frame or m.encode(msg)
        if self.uplinks is not None and self.uplinks.send(node_id, frame):
            return True
        return self._send_control(node_id, frame)

    def _send_control(self, node_id: str, frame: bytes) -> bool:
        try:
            fut = self.sock.send_multipart([node_id.encode(), frame])
        except zmq.ZMQError as exc:
            log.warning("cannot reach node %s: %s", node_id, exc)
            return False
        if fut.done() and fut.exception() is not None:
            log.warning("cannot reach node %s: %s", node_id, fut.exception())
            return False
        return True

    # ---- requests --------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, arrival: float,
               events: asyncio.Queue | None = None, index: int = 0) -> Inflight:
        """Route a validated request and send it to its decode node.

        ``events``/``index``: the queue (shared by one HTTP response's sequences)
        and the sequence number its events are tagged with (see
        :class:`router.inflight.Inflight`). A request asking for prompt logprobs
        is prefilled locally whatever the policy says (reason ``prompt_logprobs``):
        they come from the prefill's logits, which a remote prefill keeps.
        Raises :class:`ProtocolError` 503 when no decode node is up, 429 when the
        request is predicted to miss the TTFT SLO (:mod:`router.admission`).
        """
        block_size = self.registry.block_size()
        hashes = hash_blocks(prompt, block_size) if block_size else []
        pick = self.registry.pick_decode(hashes, len(prompt))
        if pick is None:
            raise ProtocolError(503, "no decode node is available; retry shortly",
                                code="no_decode_node", type="service_unavailable")
        decode, cached = pick
        prefill = self.registry.pick_prefill(len(prompt))
        inp = RouteInput(len(prompt), min(cached, len(prompt)), 0, decode.info.kv_bytes_per_token,
                         decode.as_load(), prefill.as_load() if prefill else None, block_size)
        decision = Decision("local", "prompt_logprobs") if params.needs_local_prefill \
            else self.policy.decide(inp)
        self.admission.check(inp, decision.route)      # a 429 if it would miss the TTFT SLO
        self.metrics.route_decisions.labels(policy=self.policy.name, route=decision.route,
                                            reason=decision.reason).inc()
        # unique past a router restart; a node with several routers answers the router
        # whose id ends it (disagg/node/router_links.py): keep the "-" + 8 chars suffix
        rid = f"r{next(self._ids)}-{self.router_id[:8]}"
        log.debug("%s → %s via %s (%s): %s", rid, decision.route, decode.node_id,
                  decision.reason, decision.detail)
        remote = decision.route == "remote"
        req = Inflight(rid, prompt, params, hashes, arrival, decode.node_id,
                       prefill.node_id if remote else None, decision.route, index=index)
        if events is not None:
            req.events = events
        self.inflight[rid] = req
        if remote:
            prefill.pending[rid] = len(prompt)
        else:
            decode.pending[rid] = inp.uncached_decode
        self.registry.prefixes.insert(decode.node_id, hashes)
        if not self.send(decode.node_id, m.Generate(rid, prompt, params.to_dict(), remote)):
            self.node_lost(self.registry.remove(decode.node_id), "unreachable")
        req.dispatch_s = time.monotonic() - arrival
        self.metrics.prompt_tokens.inc(len(prompt))
        return req

    def abort(self, rid: str) -> None:
        """The client went away: free the request everywhere (no-op once it ended)."""
        req = self.inflight.pop(rid, None)
        if req is None:
            return
        if req.decode:                          # "" while parked (router.migration)
            self.send(req.decode, m.Abort(rid))
        if req.prefill is not None and not req.kv_done:
            self.send(req.prefill, m.Abort(rid))
        self.unpend(req)
        self.metrics.requests.labels(route=self.final_route(req, None), status="aborted").inc()

    def fall_back(self, req: Inflight, reason: str) -> None:
        """Tell the decode node to prefill ``req`` itself (once; not after its KV landed)."""
        if req.fell_back or req.kv_done:
            return
        req.fell_back = True
        self.metrics.fallbacks.labels(reason=reason).inc()
        log.warning("%s: remote prefill on %s failed (%s); falling back to local prefill",
                    req.rid, req.prefill, reason)
        self.unpend(req, decode=False)
        self.send(req.decode, m.Fallback(req.rid, reason))

    def fail(self, req: Inflight, error: ProtocolError) -> None:
        """End ``req`` with ``error`` (its nodes are told to drop it)."""
        if self.inflight.pop(req.rid, None) is None:
            return
        self.unpend(req)
        if req.prefill is not None and not req.kv_done:
            self.send(req.prefill, m.Abort(req.rid))
        self.metrics.requests.labels(route=self.final_route(req, None), status="error").inc()
        req.deliver(Event(finished=True, error=error))

    def node_lost(self, node, reason: str) -> None:
        """Recover the requests a dead (or replaced) node held."""
        if node is None:
            return
        if reason != "restarted":
            self.lost[node.node_id] = node.info.role
        self.handlers.update_node_gauges()
        for req in list(self.inflight.values()):
            if req.prefill == node.node_id and req.route == "remote":
                self.fall_back(req, "prefill_node_lost")
            elif req.decode == node.node_id:
                self.migrator.decode_lost(req, reason)

    def unpend(self, req: Inflight, decode: bool = True) -> None:
        """The request no longer waits for prefill on its nodes (for load estimates)."""
        for node_id in ((req.decode,) if decode else ()) + ((req.prefill,) if req.prefill else ()):
            node = self.registry.nodes.get(node_id)
            if node is not None:
                node.pending.pop(req.rid, None)

    @staticmethod
    def final_route(req: Inflight, reported: str | None) -> str:
        """Where ``req``'s prefill ran, for metrics."""
        if req.fell_back or reported == "fallback":
            return "fallback"
        return reported or req.route

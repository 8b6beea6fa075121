"""What the router does with each message a node sends (see ``disagg.control.messages``).

Every handler runs on the serving loop and returns at once. Messages about a
request the router no longer knows (it ended, or the router restarted) get
an ``Abort`` back, so the node frees its blocks.

Node life as the router sees it: ``Register`` (a known node id with a new pid
counts as a restart, ``disagg_node_restarts_total``; what it reported sets
``disagg_node_tp`` etc.) → heartbeats (load, the leak gauges
``disagg_node_requests`` etc.) → ``Drain`` (still registered, never
picked; a request that crossed the Drain comes back ``Rejected(DRAINING)`` and
is routed again) → ``Deregister`` (removed; what it still held is recovered as
for a lost node, but it is not counted "down": it left on purpose). A node no
longer registered (left, dropped, refused) has no per-node series.

Each measurement fed to the policy's calibration also updates
``disagg_cost_model_observations`` (how many back each fit), whatever the policy.
"""

from __future__ import annotations

import logging
import time

from disagg.control import messages as m
from router.inflight import Event
from router.errors import ProtocolError

log = logging.getLogger("disagg.router")

_UNKEYED = frozenset({""})
"""The calibration rows without a node label (link, remote overhead)."""


def _registration_figures(msg: m.Register) -> dict[str, int]:
    """What a ``Register`` says of the node's size, by :data:`router.metrics.NODE_REGISTRATION`
    key: ``compute_units`` is its GPUs if it reports any, else its CPU cores (0: an older
    node that reports neither)."""
    return {"tp": msg.tp, "compute_units": len(msg.gpus) if msg.gpus else len(msg.cpus),
            "kv_capacity_tokens": msg.num_kv_blocks * msg.block_size,
            "kv_bytes_per_token": msg.kv_bytes_per_token}


class ControlHandlers:
    """Message type → handler, over a :class:`router.dispatch.Dispatcher`'s state."""

    def __init__(self, dispatcher) -> None:
        self.d = dispatcher
        self._table = {m.Register: self.register, m.Heartbeat: self.heartbeat,
                       m.KVTarget: self.kv_target, m.FirstToken: self.first_token,
                       m.KVSent: self.kv_sent, m.Tokens: self.tokens,
                       m.StepTokens: self.step_tokens, m.Rejected: self.rejected,
                       m.Drain: self.drain, m.Deregister: self.deregister,
                       m.UplinkSwitch: self.uplink_switch}
        self._pids: dict[str, int] = {}     # node id → pid it last registered with
        self._gauged: dict[str, str] = {}   # node id → role, for its per-node gauge series
        self._count_observations()           # the shared fits' counts, 0 from the first scrape

    def handle(self, node_id: str, msg, frame: bytes) -> None:
        """Dispatch one message from ``node_id`` (``frame`` is its encoding)."""
        handler = self._table.get(type(msg))
        if handler is None:
            log.error("node %s sent %s, which nodes do not send", node_id, type(msg).__name__)
            return
        if isinstance(msg, m.Heartbeat):           # sent from the node's "hb:" socket
            node_id = msg.node_id
        elif node_id not in self.d.registry.nodes and not isinstance(
                msg, (m.Register, m.Deregister)):
            self.d.send(node_id, m.RegisterAgain(node_id))
        handler(node_id, msg, frame)

    # ---- nodes -----------------------------------------------------------
    def register(self, node_id: str, msg: m.Register, frame: bytes) -> None:
        """A node (re)joins; a previous incarnation's requests are recovered first."""
        if msg.node_id != node_id:
            self.d.send(node_id, m.Refused(node_id, f"node_id {msg.node_id!r} differs from the "
                                                    f"socket identity {node_id!r}"))
            return
        old = self.d.registry.nodes.get(node_id)
        if old is not None and old.info == msg:        # a repeated Register: just re-ack
            self.d.send(node_id, m.Registered(node_id, self.d.router_id, self.d.uplink_port))
            return
        try:
            self.d.registry.check(msg)
        except ValueError as exc:
            # the same process sending a bad Register (a broken or hostile frame) keeps
            # its registration; a new process under that id replaced the old one
            if old is not None and old.info.pid != msg.pid:
                self.d.registry.remove(node_id)
                self.d.node_lost(old, "restarted")
                self.update_node_gauges()
            log.error("refused node %s: %s", node_id, exc)
            self.d.send(node_id, m.Refused(node_id, str(exc)))
            return
        if self.d.registry.remove(node_id) is not None and old.info.pid != msg.pid:
            self.d.node_lost(old, "restarted")
        self.d.registry.register(msg)
        self.d.lost.pop(node_id, None)
        log.info("node %s joined: %s, TP %d, %d KV blocks, pid %d on %s", node_id, msg.role,
                 msg.tp, msg.num_kv_blocks, msg.pid, msg.host)
        if self._pids.get(node_id, msg.pid) != msg.pid:
            log.warning("node %s was restarted (pid %d -> %d)", node_id, self._pids[node_id],
                        msg.pid)
            self.d.metrics.node_restarts.labels(role=msg.role).inc()
        self._pids[node_id] = msg.pid
        self.d.send(node_id, m.Registered(node_id, self.d.router_id, self.d.uplink_port))
        if self._gauged.get(node_id, msg.role) != msg.role:    # back in another role
            self._forget_series(node_id)
        for key, value in _registration_figures(msg).items():
            self.d.metrics.node_registration[key].labels(node=node_id, role=msg.role).set(value)
        self._gauged[node_id] = msg.role
        self.update_node_gauges()
        self.d.migrator.resume_parked()     # requests of a lost node waiting for one

    def uplink_switch(self, node_id: str, msg: m.UplinkSwitch, frame: bytes) -> None:
        """The node's later messages come on its uplink (``router.uplinks``)."""
        if self.d.uplinks is None:
            log.error("node %s switched to an uplink this router does not listen for",
                      node_id)
            return
        self.d.uplinks.switch(node_id, msg.pid)

    def drain(self, node_id: str, msg: m.Drain, frame: bytes) -> None:
        """The node is leaving: keep it (heartbeats, its requests) but route nothing new
        to it."""
        node = self.d.registry.nodes.get(node_id)
        if node is None or node.draining:
            return
        node.draining = True
        log.info("node %s (%s) is draining: no new requests go to it", node_id,
                 node.info.role)
        self.update_node_gauges()

    def deregister(self, node_id: str, msg: m.Deregister, frame: bytes) -> None:
        """The node left: forget it and recover whatever it still held."""
        node = self.d.registry.remove(node_id)
        if node is None:
            return
        log.info("node %s (%s) left", node_id, node.info.role)
        self.d.node_lost(node, "deregistered")
        self.d.lost.pop(node_id, None)                 # it left on purpose: not "down"
        self.update_node_gauges()

    def heartbeat(self, node_id: str, msg: m.Heartbeat, frame: bytes) -> None:
        """Load and measurements: gauges, KV byte counter, cost-model calibration."""
        node = self.d.registry.heartbeat(msg)
        if node is None:
            self.d.send(node_id, m.RegisterAgain(node_id))
            return
        met, role = self.d.metrics, node.info.role
        labels = dict(node=node_id, role=role)
        met.queue_depth.labels(**labels).set(msg.load.get("num_running", 0)
                                             + msg.load.get("num_waiting", 0))
        met.kv_usage.labels(**labels).set(float(msg.load.get("kv_usage", 0.0)))
        for key, gauge in met.node_holdings.items():
            gauge.labels(**labels).set(msg.load.get(key, 0))
        self._gauged[node_id] = role
        if role == "decode":
            got = max(msg.kv_bytes_received, 0)     # a counter: a negative one is malformed
            met.kv_transfer_bytes.inc(got - node.kv_bytes_received if got >= node.kv_bytes_received
                                      else got)
            node.kv_bytes_received = got
        policy = self.d.policy
        try:
            for prefill_tokens, decodes, seconds in msg.steps:
                if prefill_tokens:
                    policy.observe_prefill(role, node_id, prefill_tokens + decodes, seconds)
                elif decodes:
                    policy.observe_decode_step(node_id, decodes, seconds)
        except (TypeError, ValueError) as exc:
            log.error("bad step timings from %s: %s", node_id, exc)
        if msg.steps:
            self._count_observations(frozenset({"*", node_id}))

    def _count_observations(self, nodes: frozenset[str] | None = None) -> None:
        """``disagg_cost_model_observations`` from the calibration's counts (only the rows
        of ``nodes``, see :meth:`router.calibration.Calibration.observation_counts`)."""
        gauge = self.d.metrics.calibration_observations
        for name, labels, count in self.d.policy.calibration.observation_counts(nodes):
            gauge.labels(name=name, role=labels.get("role", ""),
                         node=labels.get("node", "")).set(count)

    def update_node_gauges(self) -> None:
        """``disagg_nodes{role,state}``: registered and taking requests (up), registered
        and leaving (draining), dropped and not back yet (down). A node no longer
        registered loses its per-node series (queue depth, KV usage, what it holds, what
        it registered with)."""
        met, reg = self.d.metrics, self.d.registry
        for role in ("prefill", "decode"):
            nodes = reg.of_role(role)
            met.nodes.labels(role=role, state="up").set(sum(not n.draining for n in nodes))
            met.nodes.labels(role=role, state="draining").set(sum(n.draining for n in nodes))
            met.nodes.labels(role=role, state="down").set(
                sum(r == role for r in self.d.lost.values()))
        for node_id in [n for n in self._gauged if n not in reg.nodes]:
            self._forget_series(node_id)

    def _forget_series(self, node_id: str) -> None:
        """Remove ``node_id``'s per-node series (under the role they were set with)."""
        met, role = self.d.metrics, self._gauged.pop(node_id)
        for gauge in (met.queue_depth, met.kv_usage, *met.node_holdings.values(),
                      *met.node_registration.values()):
            gauge.remove(node_id, role)

    # ---- requests --------------------------------------------------------
    def _request(self, node_id: str, rid: str):
        req = self.d.inflight.get(rid)
        if req is None:
            self.d.send(node_id, m.Abort(rid))
        return req

    def kv_target(self, node_id: str, msg: m.KVTarget, frame: bytes) -> None:
        """Blocks reserved on the decode node: ask the prefill node to fill them."""
        req = self._request(node_id, msg.rid)
        if req is None:
            return
        self._ingress(req, msg.received_at)
        self.d.metrics.prefix_cached_tokens.inc(msg.num_cached_tokens)
        node = self.d.registry.nodes.get(req.decode)
        missing = len(msg.target.get("block_ids", [])) - msg.num_cached_tokens // (
            node.info.block_size if node else 1)
        req.transfer_bytes = max(missing, 0) * (node.info.block_size * node.info.kv_bytes_per_token
                                                if node else 0)
        if req.fell_back:
            return
        if req.prefill not in self.d.registry.nodes or not self.d.send(
                req.prefill, m.Prefill(req.rid, req.prompt, req.params.to_dict(), msg.target)):
            self.d.fall_back(req, "prefill_node_lost")

    def first_token(self, node_id: str, msg: m.FirstToken, frame: bytes) -> None:
        """The remote prefill's first token: to the client now, and on to the decode node."""
        req = self._request(node_id, msg.rid)
        if req is None or req.fell_back or node_id != req.prefill:   # not after a migration
            return
        self.d.unpend(req, decode=False)
        self.d.send(req.decode, msg, frame)
        now = time.monotonic()
        if req.num_output == 0:
            self._deliver(req, [msg.token_id], [m.logprobs_from_wire(msg.logprobs)], 1, msg.sent_at)
            self.d.policy.observe_remote_overhead(max(now - req.arrival - msg.prefill_s, 0.0))
            self._count_observations(_UNKEYED)

    def kv_sent(self, node_id: str, msg: m.KVSent, frame: bytes) -> None:
        """The transfer ended: calibrate the link, or fall back on an error."""
        req = self.d.inflight.get(msg.rid)
        if req is None:
            return
        if msg.error:
            self.d.fall_back(req, "kv_transfer_failed")
            return
        req.kv_done = True
        self.d.metrics.kv_transfer_seconds.inc(msg.seconds)
        self.d.policy.observe_transfer(req.transfer_bytes, msg.seconds)
        self._count_observations(_UNKEYED)

    def step_tokens(self, node_id: str, msg: m.StepTokens, frame: bytes) -> None:
        """One engine step's tokens: each item as if it had come alone (a failing item
        is logged and the rest still delivered)."""
        for item in msg.items:
            try:
                self.tokens(node_id, item, b"")
            except Exception:            # a bug in one request must not starve the others
                log.exception("error handling the tokens of %s", item.rid)

    def tokens(self, node_id: str, msg: m.Tokens, frame: bytes) -> None:
        """New tokens (and maybe the end) from the decode node."""
        req = self.d.inflight.get(msg.rid)
        if req is None:
            if not msg.finished:
                self.d.send(node_id, m.Abort(msg.rid))
            return
        if node_id != req.decode:           # the request moved on from a node presumed lost
            if not msg.finished:
                self.d.send(node_id, m.Abort(msg.rid))
            return
        if msg.received_at is not None:
            self._ingress(req, msg.received_at)
        start = msg.output_len - len(msg.new_token_ids)
        if start > req.num_output:      # a gap: a stale copy of a request that moved back here
            log.warning("%s: tokens from %d on from %s, %d delivered; ignored", msg.rid, start,
                        node_id, req.num_output)
            return
        skip = max(req.num_output - start, 0)      # a remote first token already delivered
        ids = msg.new_token_ids[skip:]
        lps = [m.logprobs_from_wire(e) for e in msg.logprobs[skip:]] if msg.logprobs \
            else [None] * len(ids)
        if ids or msg.finished:
            self.d.unpend(req)
            self._deliver(req, ids, lps, msg.output_len, msg.sent_at, msg)

    def rejected(self, node_id: str, msg: m.Rejected, frame: bytes) -> None:
        """A node refused a request: the prefill side falls back, the decode side fails it;
        a draining node's refusal (the request crossed its ``Drain``) is no failure: the
        request goes to another decode node, or prefills locally."""
        req = self.d.inflight.get(msg.rid)
        if req is None:
            return
        if msg.error == m.DRAINING:
            self.drain(node_id, m.Drain(node_id), b"")
            if node_id == req.decode:
                self.d.migrator.decode_lost(req, "node_draining")
            elif node_id == req.prefill:
                self.d.fall_back(req, "prefill_draining")
            return
        if node_id == req.prefill and node_id != req.decode:
            self.d.fall_back(req, "prefill_rejected")
        else:
            self.d.fail(req, ProtocolError(400, f"the decode node refused the request: {msg.error}"))

    def _ingress(self, req, received_at: float) -> None:
        """The decode node got ``req`` at ``received_at``: record the hop once."""
        if req.ingress_s is None:
            req.ingress_s = received_at - req.arrival
            self.d.metrics.router_overhead.labels(direction="ingress").observe(
                max(req.ingress_s, 0.0))

    def _deliver(self, req, ids: list, lps: list, output_len: int, sent_at: float,
                 end: m.Tokens | None = None) -> None:
        """Hand tokens (and the end) to the HTTP handler; latency metrics."""
        met, now = self.d.metrics, time.monotonic()
        if ids:
            if req.first_token_at is None:
                req.first_token_at = now
                met.ttft.observe(now - req.arrival)
            elif req.last_token_at is not None:
                met.itl_soon.observe(now - req.last_token_at)
            req.last_token_at = now
            req.num_output = max(req.num_output, output_len)
            req.output_ids += ids
            met.generation_tokens_soon.inc(len(ids))
        finished = end is not None and end.finished
        prompt_lps = None
        if end is not None and end.prompt_logprobs is not None:
            prompt_lps = [m.logprobs_from_wire(e) for e in end.prompt_logprobs]
        req.deliver(Event(ids, lps, finished, end.finish_reason if end else None,
                          end.text if end else None, sent_at=sent_at,
                          prompt_logprobs=prompt_lps))
        if finished:
            self.d.inflight.pop(req.rid, None)
            status = "aborted" if end.finish_reason == "abort" else "ok"
            met.requests.labels(route=self.d.final_route(req, end.route), status=status).inc()
            met.e2e.observe(now - req.arrival)

"""Request migration: a lost decode node's requests carry on on another decode node.

When a decode node is lost (its connection ended, it went silent, it was
restarted, it cannot be reached, or it left), every request it served is
sent again, with its prompt and the output tokens already delivered to the
client (``Generate.resume_token_ids``), to another decode node, which
prefills both and carries on; the client's stream goes on where it stopped::

    client  ◀── t0 t1 t2 ──── t3 t4 … (same stream)
    decode-0    t0 t1 t2 ✗ (lost)
    decode-1              Generate(prompt, resume=[t0 t1 t2]) → t3 t4 …

A greedy request's output is what it would have been without the fault; a
sampled one continues from the tokens sent. Tokens the lost node still sends
are ignored (they no longer come from the request's decode node). With no
decode node up the request is *parked* and placed when one registers
(:meth:`Migrator.resume_parked`), or fails after ``wait_s``. A request moves
at most ``max_migrations`` times; one more loss ends it with the 502
``node_lost`` error event, as does the wait running out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

from disagg.control import messages as m
from router.errors import ProtocolError
from router.inflight import Inflight

log = logging.getLogger("disagg.router")


@dataclass(frozen=True)
class MigrationConfig:
    """``max_migrations``: how often one request may move (0: never, a lost decode node
    fails its requests); ``wait_s``: how long a request waits for a decode node when
    none is up."""

    max_migrations: int = 3
    wait_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_migrations, bool) or not isinstance(self.max_migrations, int) \
                or self.max_migrations < 0:
            raise ValueError(f"max_migrations must be an int >= 0, got {self.max_migrations!r}")
        if isinstance(self.wait_s, bool) or not isinstance(self.wait_s, (int, float)) \
                or not math.isfinite(self.wait_s) or self.wait_s <= 0:
            raise ValueError(f"migration wait_s must be a number > 0, got {self.wait_s!r}")


def add_migration_args(p) -> None:
    """``--max-migrations`` and ``--migration-wait-s`` (the router's and ``disagg serve``'s)."""
    p.add_argument("--max-migrations", type=int, default=MigrationConfig.max_migrations,
                   help="times one request may move off a lost decode node to another (it "
                        "resumes with the tokens already sent); one more loss ends it with a "
                        "502 error event; 0 = never move (default 3)")
    p.add_argument("--migration-wait-s", type=float, default=MigrationConfig.wait_s,
                   help="how long a lost decode node's request waits for a decode node to "
                        "come up when none is, before it ends with a 502 error event "
                        "(default 60)")


def node_lost_error(reason: str, detail: str = "") -> ProtocolError:
    """The 502 event that ends a request its decode node's loss could not be recovered from."""
    return ProtocolError(502, f"the decode node serving this request was lost ({reason}){detail}",
                         code="node_lost", type="server_error")


class Migrator:
    """Moves requests off lost decode nodes, over a :class:`router.dispatch.Dispatcher`'s
    state (its registry, in-flight requests, metrics and socket)."""

    def __init__(self, dispatcher, config: MigrationConfig) -> None:
        self.d = dispatcher
        self.config = config
        dispatcher.metrics.parked_requests.set_function(lambda: len(self.parked()))

    def parked(self) -> list[Inflight]:
        """Requests waiting for a decode node, longest-waiting first."""
        return sorted((r for r in self.d.inflight.values() if r.parked_until is not None),
                      key=lambda r: r.parked_until)

    def decode_lost(self, req: Inflight, reason: str) -> None:
        """``req``'s decode node is gone (``reason``): move it, park it, or end it."""
        d = self.d
        d.unpend(req)
        if req.prefill is not None and not req.kv_done:     # its KV was bound for the lost node
            d.send(req.prefill, m.Abort(req.rid))
        req.prefill, req.route, req.kv_done = None, "local", True
        if req.migrations >= self.config.max_migrations:
            d.metrics.migration_failures.labels(reason="max_migrations").inc()
            log.warning("%s: decode node %s lost (%s) after %d migrations; giving up", req.rid,
                        req.decode, reason, req.migrations)
            d.fail(req, node_lost_error(reason, f"; it moved {req.migrations} times already"))
            return
        req.migrations += 1
        d.metrics.migrations.labels(reason=reason).inc()
        lost, req.decode = req.decode, ""              # tokens from anywhere are stale now
        if not self._place(req, lost, reason):
            req.parked_until = time.monotonic() + self.config.wait_s
            log.warning("%s: decode node %s lost (%s); no decode node is up, waiting up to "
                        "%g s for one", req.rid, lost, reason, self.config.wait_s)

    def resume_parked(self) -> None:
        """Place parked requests on the decode nodes now up (after a registration)."""
        for req in self.parked():
            if not self._place(req, "", "parked"):
                return

    def expire(self, now: float) -> None:
        """End the parked requests whose wait ran out."""
        for req in self.parked():
            if req.parked_until <= now:
                self.d.metrics.migration_failures.labels(reason="wait_timeout").inc()
                log.warning("%s: no decode node came up within %g s; giving up", req.rid,
                            self.config.wait_s)
                self.d.fail(req, node_lost_error(
                    "no decode node came up within %g s" % self.config.wait_s))

    def _place(self, req: Inflight, lost: str, reason: str) -> bool:
        """Send ``req`` (prompt + delivered output) to the best decode node; False if none."""
        d = self.d
        num_tokens = len(req.prompt) + len(req.output_ids)
        pick = d.registry.pick_decode(req.hashes, num_tokens)
        if pick is None:
            return False
        node, cached = pick
        req.decode, req.parked_until = node.node_id, None
        node.pending[req.rid] = max(num_tokens - cached, 0)
        d.registry.prefixes.insert(node.node_id, req.hashes)
        params = req.params
        if req.output_ids and params.prompt_logprobs is not None:   # sent with the first token
            params = dataclasses.replace(params, prompt_logprobs=None)
        log.warning("%s: %s (%s); resuming on %s after %d tokens", req.rid,
                    f"decode node {lost} lost" if lost else "waited for a decode node", reason,
                    node.node_id, len(req.output_ids))
        if not d.send(node.node_id, m.Generate(req.rid, req.prompt, params.to_dict(), False,
                                               resume_token_ids=list(req.output_ids))):
            d.node_lost(d.registry.remove(node.node_id), "unreachable")
        return True

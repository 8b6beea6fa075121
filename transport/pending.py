"""Receiver-side bookkeeping: which slices of each expected request have arrived.

A request is announced with its destination blocks and their epochs. Arrival
is tracked per ``(layer, block, local head)`` so a decode rank fed by several
prefill ranks (p > d re-sharding) is ready only when every head came::

    arrived[request] : bool (num_layers, num_blocks_expected, num_kv_heads_local)
    ready  ⇔  arrived.all()          layer l ready ⇔ arrived[l].all()

KV can come before its announcement: a decode node reserves blocks and answers
with their target while its ranks run a step, and announces them to the ranks
(``expect``) only at the next step. :class:`EarlyMessages` keeps such messages
(bounded in count, bytes and time) until then; a request that was ready,
cancelled or timed out here is not "early" (``PendingLoads.may_come``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .messages import ErrorCode, KVBlocks, WireError


@dataclass
class _Pending:
    """One request: dst block id → (position, epoch), and the arrival mask."""

    slots: dict[int, tuple[int, int]]
    arrived: np.ndarray        # (L, n, H) bool


class PendingLoads:
    """Expected KV per request on one receiver (pure bookkeeping)."""

    def __init__(self, num_layers: int, num_kv_heads: int) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self._reqs: dict[str, _Pending] = {}
        self._ready: set[str] = set()
        self._gone: OrderedDict[str, None] = OrderedDict()   # the newest GONE_KEPT ids

    GONE_KEPT = 4096

    def may_come(self, request_id: str) -> bool:
        """Whether a message for ``request_id`` may be early: it is not expected now and
        was not ready, cancelled or forgotten here lately."""
        return request_id not in self._reqs and request_id not in self._gone

    def _forget(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)
        self._gone[request_id] = None
        self._gone.move_to_end(request_id)
        while len(self._gone) > self.GONE_KEPT:
            self._gone.popitem(last=False)

    def expect(self, request_id: str, block_ids: list[int], epochs: list[int]) -> None:
        """Announce a request's destination blocks and their current epochs."""
        if request_id in self._reqs:
            raise ValueError(f"request {request_id!r} is already expected")
        if len(block_ids) != len(epochs) or len(set(block_ids)) != len(block_ids):
            raise ValueError(f"need distinct block ids and one epoch each, got "
                             f"{len(block_ids)} ids / {len(epochs)} epochs")
        slots = {b: (i, e) for i, (b, e) in enumerate(zip(block_ids, epochs))}
        arrived = np.zeros((self.num_layers, len(block_ids), self.num_kv_heads), dtype=bool)
        self._reqs[request_id] = _Pending(slots, arrived)
        if not block_ids:
            self._ready.add(request_id)

    def check(self, msg: KVBlocks) -> None:
        """Raise :class:`WireError` unless ``msg`` targets expected blocks at their epochs."""
        req = self._reqs.get(msg.request_id)
        if req is None:
            raise WireError(ErrorCode.UNKNOWN_REQUEST, f"request {msg.request_id!r} is not expected "
                            f"here (never announced, finished, cancelled or timed out)")
        for b, e in zip(msg.dst_block_ids, msg.epochs):
            slot = req.slots.get(b)
            if slot is None:
                raise WireError(ErrorCode.NOT_EXPECTED, f"block {b} is not one of request "
                                f"{msg.request_id!r}'s destination blocks")
            if slot[1] != e:
                raise WireError(ErrorCode.EPOCH, f"block {b} has epoch {slot[1]} here, message "
                                f"carries {e}: the block was freed and reused")

    def mark(self, msg: KVBlocks) -> bool:
        """Record ``msg``'s slices as arrived (after :meth:`check`); return request readiness."""
        req = self._reqs[msg.request_id]
        pos = np.array([req.slots[b][0] for b in msg.dst_block_ids])
        heads = np.array([h[1] for h in msg.heads])
        first, last = msg.layers
        req.arrived[first:last, pos[:, None], heads[None, :]] = True
        if bool(req.arrived.all()):
            self._ready.add(msg.request_id)
            return True
        return False

    def is_ready(self, request_id: str, layer: int | None = None) -> bool:
        """All slices (of ``layer``) arrived; False for unknown requests."""
        req = self._reqs.get(request_id)
        if req is None:
            return False
        mask = req.arrived if layer is None else req.arrived[layer]
        return bool(mask.all())

    def missing(self, request_id: str) -> tuple[int, int]:
        """(missing, total) ``(layer, block, head)`` slices of a request."""
        req = self._reqs.get(request_id)
        if req is None:
            return 0, 0
        return int((~req.arrived).sum()), int(req.arrived.size)

    def pop_ready(self) -> set[str]:
        """Ready request ids since the last call; their state is dropped."""
        done, self._ready = self._ready, set()
        for r in done:
            self._forget(r)
        return done

    def cancel(self, request_id: str) -> None:
        """Forget a request (no error if unknown); its late messages are not early."""
        self._forget(request_id)
        self._ready.discard(request_id)

    def request_ids(self) -> set[str]:
        """Requests still tracked."""
        return set(self._reqs)


@dataclass
class EarlyMessages:
    """Messages for requests not announced yet, kept per request in arrival order.

    At most ``max_messages`` messages and ``max_bytes`` bytes are kept, each for
    ``grace_s`` seconds; :meth:`park` refuses what does not fit (the caller then
    rejects it as for an unknown request).
    """

    grace_s: float = 5.0
    max_messages: int = 4096
    max_bytes: int = 256 << 20
    _items: dict[str, list[tuple[float, int, object]]] = field(default_factory=dict)
    _count: int = 0
    _bytes: int = 0

    def park(self, request_id: str, item, nbytes: int) -> bool:
        """Keep ``item`` (``nbytes`` long) for ``request_id``; False if it does not fit."""
        if self._count >= self.max_messages or self._bytes + nbytes > self.max_bytes:
            return False
        self._items.setdefault(request_id, []).append(
            (time.monotonic() + self.grace_s, nbytes, item))
        self._count += 1
        self._bytes += nbytes
        return True

    def take(self, request_id: str) -> list:
        """The items kept for ``request_id``, oldest first, no longer kept."""
        kept = self._items.pop(request_id, [])
        self._count -= len(kept)
        self._bytes -= sum(n for _, n, _ in kept)
        return [item for _, _, item in kept]

    def expired(self, now: float | None = None) -> list:
        """Items whose grace period ended (no longer kept), oldest request first."""
        now = time.monotonic() if now is None else now
        out = []
        for rid in [r for r, kept in self._items.items() if kept[0][0] <= now]:
            out += self.take(rid)
        return out

    def __len__(self) -> int:
        return self._count

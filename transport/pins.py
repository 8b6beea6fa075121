"""Sender-side block lifetime: blocks stay pinned until ACK or lease expiry.

Pure bookkeeping, no sockets: the owner calls :meth:`PinTable.ack` when the
receiver acknowledged a transfer and :meth:`PinTable.expire` periodically.
Either way the ``on_release(transfer_id, block_ids, reason)`` callback fires
exactly once per transfer (reason ``"acked"``, ``"expired"``, ``"error"`` or
``"closed"``); acks that arrive later are ignored::

    pin(t1) ──────────── ack(t1) → release "acked"     ack(t1) again → no-op
    pin(t2) ──── lease ──▶ expire() → release "expired" ack(t2) late → no-op
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

ReleaseFn = Callable[[str, list[int], str], None]


@dataclass
class Pin:
    """One transfer's pinned source blocks and its lease deadline (monotonic seconds)."""

    transfer_id: str
    block_ids: list[int]
    deadline: float


class PinTable:
    """Block ids pinned per transfer, each with a lease (default 30 s)."""

    def __init__(self, lease_s: float = 30.0, on_release: ReleaseFn | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        self.lease_s = lease_s
        self.on_release = on_release
        self.clock = clock
        self._pins: dict[str, Pin] = {}

    def pin(self, transfer_id: str, block_ids: list[int], now: float | None = None) -> Pin:
        """Pin ``block_ids`` for ``transfer_id``; pinning it again adds blocks, keeps the lease."""
        pin = self._pins.get(transfer_id)
        if pin is None:
            now = self.clock() if now is None else now
            pin = self._pins[transfer_id] = Pin(transfer_id, [], now + self.lease_s)
        known = set(pin.block_ids)
        pin.block_ids.extend(b for b in block_ids if b not in known and not known.add(b))
        return pin

    def ack(self, transfer_id: str) -> bool:
        """The receiver acknowledged; release. Idempotent: False if not pinned (any more)."""
        return self.release(transfer_id, "acked")

    def release(self, transfer_id: str, reason: str) -> bool:
        """Unpin ``transfer_id`` now, calling ``on_release`` once; False if not pinned."""
        pin = self._pins.pop(transfer_id, None)
        if pin is None:
            return False
        if self.on_release is not None:
            self.on_release(transfer_id, pin.block_ids, reason)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Release every transfer whose lease ran out by ``now``; return their ids."""
        now = self.clock() if now is None else now
        gone = [t for t, p in self._pins.items() if p.deadline <= now]
        for t in gone:
            self.release(t, "expired")
        return gone

    def release_all(self, reason: str = "closed") -> list[str]:
        """Release every pinned transfer (shutdown)."""
        ids = list(self._pins)
        for t in ids:
            self.release(t, reason)
        return ids

    def pinned(self) -> dict[str, list[int]]:
        """A copy of transfer id → pinned block ids."""
        return {t: list(p.block_ids) for t, p in self._pins.items()}

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._pins

    def __len__(self) -> int:
        return len(self._pins)

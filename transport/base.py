"""The transport interface: configuration, errors, and the sender/receiver ABCs.

A transfer moves the KV of one request's blocks from a prefill rank's pool to
a decode rank's pool::

    prefill rank r (KVSender)                       decode rank q (KVReceiver)
    connect(q, endpoint) ──────── HELLO ──────────▶ (checks geometry)
                         ◀─────── HELLO ──────────
                                                    expect(rid, dst blocks, epochs)
    send(rid, q, src, dst, epochs, layers) ─ KV ──▶ validate, write, mark arrived
                         ◀──────── ACK / ERROR ───
    wait(transfer) → pins released                  wait_ready(rid) / pop_ready()

Only the blocks the receiver lacks are sent (see :func:`missing_blocks`) and
only the heads the resharding plan assigns to the pair (r, q).
"""

from __future__ import annotations

import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .wire import dtype_name

KINDS = ("zmq", "shm", "cuda_ipc")


class TransportError(RuntimeError):
    """A transfer failed (rejected by the peer, geometry mismatch, closed socket)."""


class TransportTimeout(TransportError, TimeoutError):
    """A blocking wait ran past its timeout."""


@dataclass(frozen=True)
class TransportConfig:
    """How KV blocks travel.

    ``address`` is where a receiver binds (``tcp://127.0.0.1:*`` or
    ``tcp://host:0`` picks a free port, ``ipc:///path``, ``ipc://*`` a fresh
    temp path; an engine's ranks derive theirs with :func:`rank_address`); a
    sender gets the receiver's bound endpoint at ``connect`` time. ``lease_s`` is how long a
    sender keeps blocks pinned without an ACK; ``timeout_s`` bounds every
    blocking wait (and a live receiver's HELLO reply). CurveZMQ encryption is on
    when ``curve_server_public`` is set (receiver also needs ``curve_server_secret``).

    Liveness (see :mod:`transport.liveness`): a sender's link to a decode rank
    fails when the receiver's ZeroMQ handshake has not completed within
    ``connect_timeout_s``, or when its heartbeat pings (one every
    ``heartbeat_s``, answered by the peer's ZeroMQ I/O thread even while its
    engine is busy) go unanswered for ``heartbeat_timeout_s``: a stopped or
    killed receiver or a cut link fails the transfer within about
    ``heartbeat_s + heartbeat_timeout_s`` (2 s by default).
    """

    kind: str = "zmq"
    address: str = "tcp://127.0.0.1:*"
    max_message_bytes: int = 1 << 30
    lease_s: float = 30.0
    timeout_s: float = 30.0
    curve_server_public: bytes | None = None
    curve_server_secret: bytes | None = None
    connect_timeout_s: float = 2.0
    heartbeat_s: float = 0.5
    heartbeat_timeout_s: float = 1.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"transport kind {self.kind!r} is not one of {KINDS}")
        if not self.address.startswith(("tcp://", "ipc://")):
            raise ValueError(f"address {self.address!r} must start with tcp:// or ipc://")
        if self.kind != "zmq" and not self.address.startswith(("ipc://", "tcp://127.", "tcp://localhost")):
            raise ValueError(f"{self.kind} transport is same-host only; use an ipc:// or "
                             f"loopback tcp:// control address, got {self.address!r}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be a positive int, got {self.max_message_bytes!r}")
        for name in ("lease_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("connect_timeout_s", "heartbeat_s", "heartbeat_timeout_s"):
            value = getattr(self, name)      # ZeroMQ takes milliseconds (TTL: 0.1 s units, < 6553.6 s)
            if not isinstance(value, (int, float)) or not 0.001 <= value <= 3600:
                raise ValueError(f"{name} must be between 0.001 and 3600 seconds, got {value!r}")
        if not self.heartbeat_timeout_s > self.heartbeat_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                             f"heartbeat_s ({self.heartbeat_s}): a link is declared dead only "
                             f"after more than one ping went unanswered")
        if self.curve_server_secret is not None and self.curve_server_public is None:
            raise ValueError("curve_server_secret needs curve_server_public as well")
        for name in ("curve_server_public", "curve_server_secret"):
            key = getattr(self, name)
            if key is not None and len(key) != 40:
                raise ValueError(f"{name} must be a 40-byte Z85 key (zmq.curve_keypair()), "
                                 f"got {len(key)} bytes")
        if self.curve_server_public is not None and not self.address.startswith("tcp://"):
            raise ValueError("CurveZMQ is only meaningful over tcp://")


def rank_address(address: str, rank: int) -> str:
    """The address TP rank ``rank`` of an engine binds, derived from one configured address.

    ``tcp://host:*`` / ``tcp://host:0``: every rank picks a free port;
    ``tcp://host:PORT``: rank r binds ``PORT + r``; ``ipc://*``: a fresh
    socket file in the temp directory; ``ipc:///path``: ``/path-r``.
    """
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        if path in ("", "*"):
            return f"ipc://{tempfile.gettempdir()}/disagg-kv-{uuid.uuid4().hex[:12]}-{rank}"
        return f"ipc://{path}-{rank}"
    host, _, port = address[len("tcp://"):].rpartition(":")
    if not host or port in ("*", "0"):
        return address
    if not port.isdigit() or not 0 < int(port) + rank < 65536:
        raise ValueError(f"cannot derive rank {rank}'s port from {address!r}")
    return f"tcp://{host}:{int(port) + rank}"


def missing_blocks(src_block_ids: list[int], dst_block_ids: list[int], dst_epochs: list[int],
                   num_local_tokens: int, block_size: int) -> tuple[list[int], list[int], list[int]]:
    """Trim a transfer to the blocks the receiver does not hold yet.

    ``src_block_ids`` come from the sender's ``KVExport``; ``dst_block_ids`` /
    ``dst_epochs`` / ``num_local_tokens`` from the receiver's ``KVLoadTarget``,
    whose first ``num_local_tokens // block_size`` blocks are local hits.
    """
    n = min(len(src_block_ids), len(dst_block_ids))
    if len(dst_epochs) != len(dst_block_ids):
        raise ValueError(f"{len(dst_epochs)} epochs for {len(dst_block_ids)} dst blocks")
    skip = min(num_local_tokens // block_size, n)
    return list(src_block_ids[skip:n]), list(dst_block_ids[skip:n]), list(dst_epochs[skip:n])


def pool_geometry(kv_caches: list[torch.Tensor]) -> tuple[int, int, int, int, str]:
    """(num_blocks, num_kv_heads, block_size, head_dim, dtype) of per-layer HND caches."""
    if not kv_caches:
        raise ValueError("kv_caches is empty: need one (num_blocks, 2, H, B, D) tensor per layer")
    first = kv_caches[0]
    for i, t in enumerate(kv_caches):
        if t.dim() != 5 or t.shape[1] != 2 or t.shape != first.shape or t.dtype != first.dtype \
                or not t.is_contiguous():
            raise ValueError(f"kv_caches[{i}] has shape {tuple(t.shape)} / {t.dtype}; every layer "
                             f"must be a contiguous (num_blocks, 2, H, B, D) tensor like layer 0")
    n, _, h, b, d = first.shape
    return n, h, b, d, dtype_name(first.dtype)


class KVReceiver(ABC):
    """Decode side: accepts KV blocks into its own pool (one per TP rank)."""

    endpoint: str

    @abstractmethod
    def expect(self, request_id: str, block_ids: list[int], epochs: list[int]) -> None:
        """Announce the blocks (and their current epochs) a request will receive.

        Messages for unannounced requests or blocks, or with other epochs, are
        rejected. An empty ``block_ids`` makes the request ready at once.
        """

    @abstractmethod
    def poll(self, timeout_s: float = 0.0) -> int:
        """Handle incoming messages, waiting up to ``timeout_s`` for the first; return the count."""

    @abstractmethod
    def is_ready(self, request_id: str, layer: int | None = None) -> bool:
        """Whether every expected block (of ``layer``, or of all layers) has arrived."""

    @abstractmethod
    def wait_ready(self, request_id: str, timeout_s: float | None = None,
                   layer: int | None = None) -> None:
        """Poll until :meth:`is_ready`; raise :class:`TransportTimeout` after ``timeout_s``."""

    @abstractmethod
    def pop_ready(self) -> set[str]:
        """Request ids that became complete since the last call; their state is dropped."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget a request (e.g. it fell back to local prefill); later messages are rejected."""

    @abstractmethod
    def pending_request_ids(self) -> set[str]:
        """Requests announced with :meth:`expect` and not yet popped or cancelled."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets and any mapped peer pools."""


class KVSender(ABC):
    """Prefill side: sends blocks of its pool to decode ranks, keeping them pinned until ACK."""

    @abstractmethod
    def connect(self, dst_rank: int, endpoint: str, timeout_s: float | None = None):
        """Connect to decode rank ``dst_rank``'s receiver and check pool geometry (HELLO)."""

    @abstractmethod
    def send(self, request_id: str, dst_rank: int, src_block_ids: list[int],
             dst_block_ids: list[int], epochs: list[int], layers: tuple[int, int] | None = None,
             *, transfer_id: str | None = None, final: bool = True) -> str:
        """Send ``layers`` (default: all) of the blocks; return the transfer id.

        Layer-wise transfers call this once per layer range with the same
        ``transfer_id`` and ``final=True`` on the last call. The source blocks
        stay pinned until every message is acknowledged or the lease expires.
        """

    @abstractmethod
    def poll(self, timeout_s: float = 0.0) -> int:
        """Handle ACK / ERROR replies and expire leases; return the replies handled."""

    @abstractmethod
    def wait(self, transfer_id: str, timeout_s: float | None = None) -> None:
        """Block until the transfer is acknowledged; raise TransportError / TransportTimeout."""

    @abstractmethod
    def close(self) -> None:
        """Close sockets and release every still-pinned transfer (reason ``"closed"``)."""

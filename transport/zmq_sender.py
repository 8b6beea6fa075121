"""The sending half of the ZeroMQ transport (see :mod:`transport.zmq_transport`).

One DEALER socket per decode rank. A transfer is one request's blocks to one
decode rank, sent as one message (whole request) or one per layer range
(layer-wise, ``final=True`` on the last). Its source blocks stay pinned in a
:class:`~transport.pins.PinTable` until every message is ACKed, an ERROR
arrives, the lease expires, or the link drops: a :class:`~transport.liveness.LinkWatch`
per decode rank (heartbeats on a side connection, socket events) notices a
stopped or dead receiver or a cut link within ``heartbeat_s +
heartbeat_timeout_s`` and an unreachable one within ``connect_timeout_s``.
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from .base import KVSender, TransportConfig, TransportError, TransportTimeout, pool_geometry
from .liveness import LinkWatch, set_keepalive
from .pins import PinTable, ReleaseFn
from .resharding import ReshardPlan, gather_heads
from .messages import Ack, Error, Hello, KVBlocks, WireError, WireMessage
from .wire import check_ids, decode_header, encode

log = logging.getLogger(__name__)

MESSAGE_CHUNK_BYTES = 4 << 20   # a whole-request transfer is split into messages of about this


def as_bytes(t: torch.Tensor):
    """A zero-copy buffer over a contiguous CPU tensor (any dtype)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class _Transfer:
    """Sender-side state of one transfer: unacknowledged message seqs, buffer trackers."""

    def __init__(self, request_id: str, dst_rank: int) -> None:
        self.request_id, self.dst_rank = request_id, dst_rank
        self.outstanding: set[int] = set()
        self.next_seq, self.final, self.done, self.error = 0, False, False, None
        self.trackers: list[zmq.MessageTracker] = []   # zmq still reading pool memory?

    @property
    def buffers_released(self) -> bool:
        return all(t.done for t in self.trackers)


class ZmqKVSender(KVSender):
    """Prefill side: one DEALER per decode rank, blocks pinned until ACK or lease expiry.

    ``connect(..., wait=False)`` only sends the HELLO: transfers may be queued
    behind it at once (ZeroMQ keeps a socket's messages in order), and
    :meth:`poll` checks the reply. A caller that never blocks (an engine rank)
    drives everything through :meth:`poll` and collects outcomes with
    :meth:`finished`. A link that dies (see :mod:`transport.liveness`) is
    dropped in :meth:`poll` or :meth:`connected`, failing its transfers; the
    next :meth:`connect` opens a fresh one.
    """

    def __init__(self, config: TransportConfig, kv_caches: list[torch.Tensor], plan: ReshardPlan,
                 tp_rank: int = 0, on_release: ReleaseFn | None = None,
                 ctx: zmq.Context | None = None) -> None:
        n, h, b, d, dt = pool_geometry(kv_caches)
        self.config, self.kv_caches, self.plan, self.tp_rank = config, kv_caches, plan, tp_rank
        self.hello = Hello(tp_rank, plan.p, len(kv_caches), n, h, b, d, dt, self._pool_info())
        self.pins = PinTable(config.lease_s, on_release)
        self.bytes_sent = 0
        self._ctx = ctx or zmq.Context.instance()
        self._socks: dict[int, zmq.Socket] = {}
        self._watches: dict[int, LinkWatch] = {}
        self._handshakes: dict[int, tuple[float, float]] = {}   # dst rank -> HELLO (deadline, timeout)
        self._transfers: dict[str, _Transfer] = {}

    def _pool_info(self) -> dict:
        """What a receiver needs to read this pool directly (nothing for zmq)."""
        return {}

    def connect(self, dst_rank: int, endpoint: str, timeout_s: float | None = None,
                wait: bool = True) -> Hello | None:
        """Open the link to decode rank ``dst_rank``; with ``wait`` block for its HELLO.

        The HELLO reply (from the receiver's engine, which may be busy) may take
        up to ``timeout_s`` (default ``config.timeout_s``); the connection itself
        (the receiver's ZeroMQ I/O thread) must come up within
        ``config.connect_timeout_s``, and heartbeats guard it from then on.
        """
        self.plan.pairs(self.tp_rank, dst_rank)           # validates the ranks
        timeout_s = timeout_s or self.config.timeout_s
        if dst_rank in self._socks:
            self._drop(dst_rank, "reconnected")
        sock = self._dealer()
        set_keepalive(sock, self.config)
        try:
            self._watches[dst_rank] = LinkWatch(sock, self._dealer(), endpoint, self.config)
        except TransportError:             # a malformed endpoint
            sock.close(linger=0)
            raise
        sock.send(encode(self.hello))
        self._socks[dst_rank] = sock
        self._handshakes[dst_rank] = (time.monotonic() + timeout_s, timeout_s)
        if not wait:
            return None
        deadline = time.monotonic() + timeout_s
        while not sock.poll(max(1, min(50, int(1000 * (deadline - time.monotonic())))), zmq.POLLIN):
            try:
                self._watches[dst_rank].check()
            except TransportError as exc:
                self._drop(dst_rank, str(exc))
                raise type(exc)(f"handshake with decode rank {dst_rank} failed: {exc}") from None
            if time.monotonic() >= deadline:
                self._drop(dst_rank, "no HELLO reply")
                raise TransportTimeout(f"no HELLO reply from decode rank {dst_rank} at {endpoint} "
                                       f"within {timeout_s:.3g} s")
        try:
            return self._on_hello(dst_rank, decode_header(sock.recv(), (Hello, Error)))
        except (WireError, TransportError) as exc:
            self._drop(dst_rank, str(exc))
            raise TransportError(f"handshake with decode rank {dst_rank} failed: {exc}") from None

    def _dealer(self) -> zmq.Socket:
        """A DEALER with this transport's options (no linger, CURVE client keys if configured)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.config.curve_server_public is not None:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = self.config.curve_server_public
        return sock

    def _on_hello(self, dst_rank: int, peer: WireMessage) -> Hello:
        """Check a decode rank's HELLO reply against this pool and the plan."""
        if isinstance(peer, Error):
            raise TransportError(f"refused: [{peer.code}] {peer.message}")
        if not isinstance(peer, Hello):
            raise TransportError(f"expected a HELLO reply, got {type(peer).__name__}")
        me = self.hello
        mine = (me.num_layers, me.block_size, me.head_dim, me.dtype)
        theirs = (peer.num_layers, peer.block_size, peer.head_dim, peer.dtype)
        pairs = self.plan.pairs(self.tp_rank, dst_rank)
        if mine != theirs or peer.tp_size != self.plan.d or peer.tp_rank != dst_rank \
                or any(dh >= peer.num_kv_heads for _, dh in pairs):
            raise TransportError(f"pool mismatch: (layers, block_size, head_dim, dtype) {mine} vs "
                                 f"{theirs}; tp {peer.tp_rank}/{peer.tp_size} vs plan d={self.plan.d}")
        self._handshakes.pop(dst_rank, None)
        return peer

    def _drop(self, dst_rank: int, reason: str) -> None:
        """Close the link to ``dst_rank`` (queued messages are discarded) and fail its transfers."""
        sock, watch = self._socks.pop(dst_rank, None), self._watches.pop(dst_rank, None)
        self._handshakes.pop(dst_rank, None)
        if watch is not None:
            watch.close()
        if sock is not None:
            sock.close(linger=0)
        for tid, tr in self._transfers.items():
            if tr.dst_rank == dst_rank and not tr.done:
                tr.error, tr.done = f"link to decode rank {dst_rank} dropped: {reason}", True
                self.pins.release(tid, "error")

    def connected(self, dst_rank: int) -> bool:
        """Whether a link to ``dst_rank`` is open (its handshake may still be pending).

        Links found dead are dropped first, so a caller that reconnects when
        this is False gets a fresh link instead of queueing into a dead one.
        """
        self._check_links(time.monotonic())
        return dst_rank in self._socks

    def idle(self) -> bool:
        """No link open and no transfer left to report: closing this sender loses nothing
        (a link that died was dropped, and its transfers were popped by :meth:`finished`)."""
        return not self._socks and not self._transfers

    def _check_links(self, now: float) -> None:
        """Drop every link whose :class:`LinkWatch` reports it dead."""
        for q, watch in list(self._watches.items()):
            try:
                watch.check(now)
            except TransportError as exc:
                self._drop(q, str(exc))

    def send(self, request_id: str, dst_rank: int, src_block_ids: list[int],
             dst_block_ids: list[int], epochs: list[int], layers: tuple[int, int] | None = None,
             *, transfer_id: str | None = None, final: bool = True) -> str:
        pairs = self.plan.pairs(self.tp_rank, dst_rank)
        if not pairs:
            raise ValueError(f"prefill rank {self.tp_rank} owes decode rank {dst_rank} nothing; "
                             f"send only to plan.dst_ranks({self.tp_rank}) = {self.plan.dst_ranks(self.tp_rank)}")
        if dst_rank not in self._socks:
            raise TransportError(f"not connected to decode rank {dst_rank}; call connect() first")
        n = len(src_block_ids)
        if n == 0 or len(dst_block_ids) != n or len(epochs) != n:
            raise ValueError(f"need >0 blocks with matching counts: src {n}, dst {len(dst_block_ids)}, "
                             f"epochs {len(epochs)}")
        first, last = layers if layers is not None else (0, len(self.kv_caches))
        tid = transfer_id or f"{request_id}/{self.tp_rank}->{dst_rank}"
        try:
            check_ids(request_id, tid)
        except WireError as exc:
            raise ValueError(exc.message) from None
        tr = self._transfers.setdefault(tid, _Transfer(request_id, dst_rank))
        if tr.final or tr.done:
            raise TransportError(f"transfer {tid!r} already had its final message")
        pin = self.pins.pin(tid, list(src_block_ids))
        h, (_, _, _, b, d) = len(pairs), self.kv_caches[0].shape
        layer_bytes = n * 2 * h * b * d * self.kv_caches[0].element_size()
        pool = self._src_pool_name()
        # Frames travel in messages of at most MESSAGE_CHUNK_BYTES (whole layers): the
        # receiver then copies one message into its pool while the next arrives,
        # instead of first buffering the whole request.
        step = (last - first) if pool else max(1, MESSAGE_CHUNK_BYTES // layer_bytes)
        for lo in range(first, last, step):
            hi = min(lo + step, last)
            msg = KVBlocks(request_id, tid, tr.next_seq, final and hi == last, (lo, hi),
                           tuple(dst_block_ids), tuple(src_block_ids), tuple(epochs),
                           tuple(tuple(p) for p in pairs), self.hello.dtype, (n, 2, h, b, d),
                           (hi - lo) * layer_bytes, pool, pin.deadline if pool else 0.0)
            frames = [zmq.Frame(f, track=True) for f in self._frames(msg, [p[0] for p in pairs])]
            tr.trackers.extend(f.tracker for f in frames)
            self._socks[dst_rank].send_multipart([encode(msg), *frames], copy=False)
            tr.outstanding.add(tr.next_seq)
            tr.next_seq += 1
            self.bytes_sent += sum(len(f) for f in frames)
        tr.final = final
        return tid

    def _src_pool_name(self) -> str:
        """Empty: frames carry the data (subclasses name their shared pool)."""
        return ""

    def _frames(self, msg: KVBlocks, src_heads: list[int]) -> list:
        """One buffer per layer: pool views when contiguous, else a gathered staging buffer."""
        src, n = list(msg.src_block_ids), len(msg.src_block_ids)
        first, last = msg.layers
        if src_heads == list(range(self.hello.num_kv_heads)) and src == list(range(src[0], src[0] + n)):
            return [as_bytes(self.kv_caches[i][src[0]:src[0] + n]) for i in range(first, last)]
        staging = torch.empty((last - first, *msg.frame_shape), dtype=self.kv_caches[0].dtype)
        for j, i in enumerate(range(first, last)):
            gather_heads(self.kv_caches[i], src, src_heads, out=staging[j])
        return [as_bytes(staging[j]) for j in range(last - first)]

    def poll(self, timeout_s: float = 0.0) -> int:
        handled = 0
        poller = zmq.Poller()
        ranks = {}
        for q, sock in self._socks.items():
            poller.register(sock, zmq.POLLIN)
            ranks[sock] = q
            for mon in self._watches[q].monitors:       # a link event ends the wait too
                poller.register(mon, zmq.POLLIN)
        for sock, _ in poller.poll(int(timeout_s * 1000)) if self._socks else []:
            q = ranks.get(sock)
            if q is None:                               # a monitor: read by _check_links below
                continue
            while q in self._socks:
                try:
                    reply = decode_header(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                except WireError as exc:
                    log.warning("bad reply from KV receiver %d: %s", q, exc)
                    continue
                handled += 1
                if q in self._handshakes:              # the first reply answers the HELLO
                    try:
                        self._on_hello(q, reply)
                    except TransportError as exc:
                        self._drop(q, f"handshake failed: {exc}")
                elif isinstance(reply, (Ack, Error)):
                    self._on_reply(reply)
        now = time.monotonic()
        self._check_links(now)                          # after the replies: ACKs that made it count
        for q in [q for q, (t, _) in self._handshakes.items() if t <= now]:
            self._drop(q, f"no HELLO reply within {self._handshakes[q][1]:.3g} s")
        for tid in self.pins.expire(now):
            tr = self._transfers.get(tid)
            if tr is not None and not tr.done:
                tr.error, tr.done = f"lease of {self.config.lease_s} s expired before the ACK", True
                if not tr.buffers_released:            # frames stuck in ZeroMQ: discard them
                    self._drop(tr.dst_rank, "lease expired with messages still queued")
        return handled

    def finished(self) -> list[tuple[str, str, str | None]]:
        """Pop transfers that ended, as ``(transfer_id, request_id, error or None)``.

        A transfer is reported only once ZeroMQ no longer reads its source
        blocks, so the caller may free them as soon as it sees it here.
        """
        out = [(tid, tr.request_id, tr.error) for tid, tr in self._transfers.items()
               if tr.done and tr.buffers_released]
        for tid, _, _ in out:
            del self._transfers[tid]
        return out

    def _on_reply(self, reply: Ack | Error) -> None:
        """Apply one ACK / ERROR to its transfer."""
        tr = self._transfers.get(reply.transfer_id)
        if tr is None or tr.done:
            return
        if isinstance(reply, Error):
            tr.error, tr.done = f"[{reply.code}] {reply.message}", True
            self.pins.release(reply.transfer_id, "error")
            return
        tr.outstanding.discard(reply.seq)
        if tr.final and not tr.outstanding:
            tr.done = True
            self.pins.ack(reply.transfer_id)

    def wait(self, transfer_id: str, timeout_s: float | None = None) -> None:
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        tr = self._transfers.get(transfer_id)
        if tr is None:
            raise TransportError(f"unknown transfer {transfer_id!r}")
        deadline = time.monotonic() + timeout_s
        while not tr.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(f"transfer {transfer_id!r}: {len(tr.outstanding)} message(s) "
                                       f"unacknowledged after {timeout_s:.3g} s")
            self.poll(min(left, 0.05))
        del self._transfers[transfer_id]
        if tr.error:
            raise TransportError(f"decode rank {tr.dst_rank} rejected transfer {transfer_id!r}: {tr.error}")

    def close(self) -> None:
        for q in list(self._socks):
            self._drop(q, "sender closed")
        self.pins.release_all("closed")

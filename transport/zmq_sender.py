"""The sending half of the ZeroMQ transport (see :mod:`transport.zmq_transport`).

One DEALER socket per decode rank. A transfer is one request's blocks to one
decode rank, sent as one message (whole request) or one per layer range
(layer-wise, ``final=True`` on the last). Its source blocks stay pinned in a
:class:`~transport.pins.PinTable` until every message is ACKed, an ERROR
arrives, or the lease expires.
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from .base import KVSender, TransportConfig, TransportError, TransportTimeout, pool_geometry
from .pins import PinTable, ReleaseFn
from .resharding import ReshardPlan, gather_heads
from .wire import Ack, Error, Hello, Kind, KVBlocks, WireError, decode_header, encode

log = logging.getLogger(__name__)


def as_bytes(t: torch.Tensor):
    """A zero-copy buffer over a contiguous CPU tensor (any dtype)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class _Transfer:
    """Sender-side state of one transfer: unacknowledged message seqs."""

    def __init__(self, request_id: str, dst_rank: int) -> None:
        self.request_id, self.dst_rank = request_id, dst_rank
        self.outstanding: set[int] = set()
        self.next_seq, self.final, self.done, self.error = 0, False, False, None


class ZmqKVSender(KVSender):
    """Prefill side: one DEALER per decode rank, blocks pinned until ACK or lease expiry."""

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
        self._transfers: dict[str, _Transfer] = {}

    def _pool_info(self) -> dict:
        """What a receiver needs to read this pool directly (nothing for zmq)."""
        return {}

    def connect(self, dst_rank: int, endpoint: str, timeout_s: float | None = None) -> Hello:
        pairs = self.plan.pairs(self.tp_rank, dst_rank)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.config.curve_server_public is not None:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = self.config.curve_server_public
        sock.connect(endpoint)
        sock.send(encode(self.hello))
        if not sock.poll(int(1000 * (timeout_s or self.config.timeout_s)), zmq.POLLIN):
            sock.close(linger=0)
            raise TransportTimeout(f"no HELLO reply from decode rank {dst_rank} at {endpoint} "
                                   f"within {timeout_s or self.config.timeout_s:.3g} s")
        try:
            header = decode_header(sock.recv())
        except WireError as exc:
            sock.close(linger=0)
            raise TransportError(f"unreadable HELLO reply from decode rank {dst_rank}: {exc}") from None
        if header["kind"] == Kind.ERROR:
            sock.close(linger=0)
            raise TransportError(f"decode rank {dst_rank} refused the handshake: {header.get('message')}")
        peer = Hello.from_header(header)
        me = self.hello
        mine = (me.num_layers, me.block_size, me.head_dim, me.dtype)
        theirs = (peer.num_layers, peer.block_size, peer.head_dim, peer.dtype)
        if mine != theirs or peer.tp_size != self.plan.d or peer.tp_rank != dst_rank \
                or any(dh >= peer.num_kv_heads for _, dh in pairs):
            sock.close(linger=0)
            raise TransportError(f"pool mismatch with decode rank {dst_rank}: (layers, block_size, "
                                 f"head_dim, dtype) {mine} vs {theirs}; tp {peer.tp_rank}/{peer.tp_size} "
                                 f"vs plan d={self.plan.d}")
        self._socks[dst_rank] = sock
        return peer

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
        tr = self._transfers.setdefault(tid, _Transfer(request_id, dst_rank))
        if tr.final or tr.done:
            raise TransportError(f"transfer {tid!r} already had its final message")
        self.pins.pin(tid, list(src_block_ids))
        h, (_, _, _, b, d) = len(pairs), self.kv_caches[0].shape
        shape = (n, 2, h, b, d)
        nbytes = (last - first) * n * 2 * h * b * d * self.kv_caches[0].element_size()
        msg = KVBlocks(request_id, tid, tr.next_seq, final, (first, last), tuple(dst_block_ids),
                       tuple(src_block_ids), tuple(epochs), tuple(tuple(p) for p in pairs),
                       self.hello.dtype, shape, nbytes, self._src_pool_name())
        frames = self._frames(msg, [p[0] for p in pairs])
        self._socks[dst_rank].send_multipart([encode(msg), *frames], copy=False)
        tr.outstanding.add(tr.next_seq)
        tr.next_seq += 1
        tr.final = final
        self.bytes_sent += sum(len(f) for f in frames)
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
        for s in self._socks.values():
            poller.register(s, zmq.POLLIN)
        for sock, _ in poller.poll(int(timeout_s * 1000)) if self._socks else []:
            while True:
                try:
                    header = decode_header(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                except WireError as exc:
                    log.warning("bad reply from a KV receiver: %s", exc)
                    continue
                handled += 1
                if header["kind"] in (Kind.ACK, Kind.ERROR):
                    try:
                        self._on_reply(header)
                    except WireError as exc:
                        log.warning("malformed reply from a KV receiver: %s", exc)
        for tid in self.pins.expire():
            tr = self._transfers.get(tid)
            if tr is not None and not tr.done:
                tr.error, tr.done = f"lease of {self.config.lease_s} s expired before the ACK", True
        return handled

    def _on_reply(self, header: dict) -> None:
        """Apply one ACK / ERROR to its transfer."""
        reply = (Ack if header["kind"] == Kind.ACK else Error).from_header(header)
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
        for s in self._socks.values():
            s.close(linger=0)
        self._socks.clear()
        self.pins.release_all("closed")

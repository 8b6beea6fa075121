"""KV blocks over ZeroMQ (tcp:// between hosts, ipc:// on one host).

The receiver binds a ROUTER socket and every sender connects a DEALER. ROUTER
rather than PULL because each KV message needs an answer (ACK or ERROR) back to
*its* sender, and one decode rank serves several prefill ranks (p > d): ROUTER's
peer identities route the replies, and HELLO replies carry the receiver's pool
geometry. Messages are ``[header, frame per layer]`` (see :mod:`transport.wire`);
frames leave the source pool with ``copy=False`` when the blocks are one
contiguous span with all heads, else from one gathered staging buffer. The
receiver reads frames in place (``recv_multipart(copy=False)`` +
``torch.frombuffer``) and copies them into its pool after validation.

Each sender also connects an idle heartbeat DEALER (see
:mod:`transport.liveness`); the ROUTER's I/O thread answers its pings, so a
receiver whose engine is busy still counts as alive, and the application
never sees that connection.
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from .base import KVReceiver, TransportConfig, TransportError, TransportTimeout, pool_geometry
from .liveness import set_keepalive
from .pending import EarlyMessages, PendingLoads
from .resharding import scatter_heads
from .messages import Ack, Error, ErrorCode, Hello, KVBlocks, WireError
from .wire import DTYPES, WireLimits, decode_header, encode, header_ids, validate_kv_header
from .zmq_sender import ZmqKVSender

__all__ = ["ZmqKVReceiver", "ZmqKVSender"]

log = logging.getLogger(__name__)


class ZmqKVReceiver(KVReceiver):
    """Decode side: a ROUTER socket writing validated KV frames into ``kv_caches``."""

    def __init__(self, config: TransportConfig, kv_caches: list[torch.Tensor],
                 tp_rank: int = 0, tp_size: int = 1, ctx: zmq.Context | None = None) -> None:
        n, h, b, d, dt = pool_geometry(kv_caches)
        self.config, self.kv_caches = config, kv_caches
        self.hello = Hello(tp_rank, tp_size, len(kv_caches), n, h, b, d, dt)
        self.limits = WireLimits.for_pool(self.hello, config.max_message_bytes)
        self._pending = PendingLoads(len(kv_caches), h)
        # KV that came before its expect(): kept a while (at least two messages' worth)
        self._early = EarlyMessages(max_bytes=max(256 << 20, 2 * config.max_message_bytes))
        self.bytes_received = 0
        self.messages_rejected = 0
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + (1 << 20))
        set_keepalive(self._sock, config)        # closes half-open links of vanished senders
        if config.curve_server_secret is not None:
            self._sock.curve_server = True
            self._sock.curve_publickey = config.curve_server_public
            self._sock.curve_secretkey = config.curve_server_secret
        self._sock.bind(config.address)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------- public API
    def expect(self, request_id: str, block_ids: list[int], epochs: list[int]) -> None:
        bad = [x for x in block_ids if not 0 <= x < self.limits.num_blocks]
        if bad:
            raise ValueError(f"block ids {bad} outside this pool (0..{self.limits.num_blocks - 1})")
        self._pending.expect(request_id, list(block_ids), list(epochs))
        for frames in self._early.take(request_id):
            self._handle(frames, park=False)

    def poll(self, timeout_s: float = 0.0) -> int:
        handled = 0
        if self._early:
            for frames in self._early.expired():
                self._handle(frames, park=False)     # still not announced: rejected now
        if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            while handled < 1000:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)
                handled += 1
        return handled

    def is_ready(self, request_id: str, layer: int | None = None) -> bool:
        return self._pending.is_ready(request_id, layer)

    def wait_ready(self, request_id: str, timeout_s: float | None = None,
                   layer: int | None = None) -> None:
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.is_ready(request_id, layer):
            if request_id not in self._pending.request_ids():
                raise TransportError(f"request {request_id!r} is not expected here; call expect() first")
            left = deadline - time.monotonic()
            if left <= 0:
                miss, total = self._pending.missing(request_id)
                raise TransportTimeout(
                    f"request {request_id!r}: {miss} of {total} (layer, block, head) slices still "
                    f"missing after {timeout_s:.3g} s on {self.endpoint}; is the sender running "
                    f"and connected to this endpoint?")
            self.poll(min(left, 0.05))

    def pop_ready(self) -> set[str]:
        return self._pending.pop_ready()

    def cancel(self, request_id: str) -> None:
        self._pending.cancel(request_id)

    def pending_request_ids(self) -> set[str]:
        return self._pending.request_ids()

    def close(self) -> None:
        self._sock.close(linger=0)

    # ------------------------------------------------------------- internals
    def _handle(self, frames: list, park: bool = True) -> None:
        """Answer one message; never raises (a bad message gets an ERROR reply).

        A valid message for a request not announced yet (and not gone) is kept
        unanswered until :meth:`expect` announces it (``park``; see
        ``transport.pending.EarlyMessages``)."""
        ident, body = frames[0], frames[1:]
        header = body[0].buffer if body else b""
        try:
            if not body:
                raise WireError(ErrorCode.FRAMES, "empty message: no header frame")
            msg = decode_header(header, (Hello, KVBlocks))
            if isinstance(msg, Hello):
                reply = self._on_hello(msg)
            else:
                validate_kv_header(msg, body[1:], self.limits)
                if park and self._pending.may_come(msg.request_id) and self._early.park(
                        msg.request_id, frames, sum(len(f.buffer) for f in body)):
                    return
                self._pending.check(msg)
                nbytes = self._write(msg, body[1:])
                self.bytes_received += nbytes
                reply = Ack(msg.request_id, msg.transfer_id, msg.seq, self._pending.mark(msg), nbytes)
        except WireError as exc:
            reply = self._error(exc.code, exc.message, header)
        except Exception as exc:  # a bug must not stop the receiver serving others
            log.exception("KV receiver failed on a message")
            reply = self._error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", header)
        self._sock.send_multipart([ident, encode(reply)])

    def _error(self, code: str, message: str, header) -> Error:
        """An ERROR reply echoing whatever ids the header frame carried."""
        self.messages_rejected += 1
        return Error(code, message, *header_ids(header))

    def _on_hello(self, peer: Hello) -> Hello:
        """A sender introduced itself; subclasses open its shared pool here."""
        if peer.pool:
            raise WireError(ErrorCode.UNKNOWN_POOL, "this zmq receiver cannot read peer pools; "
                            "use the shm or cuda_ipc transport")
        return self.hello

    def _write(self, msg: KVBlocks, frames: list) -> int:
        """Copy the validated frames into the pool; return the bytes written."""
        if msg.src_pool:
            raise WireError(ErrorCode.UNKNOWN_POOL, f"no shared pool {msg.src_pool!r} here")
        dtype, dst_heads = DTYPES[msg.dtype], [h[1] for h in msg.heads]
        for j, layer in enumerate(range(*msg.layers)):
            src = torch.frombuffer(frames[j].buffer, dtype=torch.uint8).view(dtype)
            scatter_heads(self.kv_caches[layer], list(msg.dst_block_ids), dst_heads,
                          src.view(msg.frame_shape))
        return msg.total_bytes

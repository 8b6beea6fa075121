"""The two processes of ``disagg bench transfer``: a KV receiver and a KV sender.

Each child is a small command server on a :class:`multiprocessing` Pipe.
Commands and replies are msgpack lists (``[name, *args]`` → ``["ok", value]``
or ``["error", traceback]``); nothing is pickled after the spawn itself::

    parent ──setup / expect / finish / verify / raw_serve──▶ receiver (polls its
       │                                                     KV socket between commands)
       └───setup / connect / send / raw_send ───────────────▶ sender (times send → ACK)

Both sides derive the KV bytes from a shared seed (:func:`layer_bytes`), so the
receiver can check its pool bit for bit without any data crossing the Pipe.
"""

from __future__ import annotations

import time
import traceback

import msgpack
import torch
import zmq

from transport.base import TransportConfig
from transport.resharding import ReshardPlan
from transport.shm_transport import ShmKVPool, ShmKVReceiver, ShmKVSender
from transport.zmq_transport import ZmqKVReceiver, ZmqKVSender
from transport.wire import DTYPES
from transport.zmq_sender import as_bytes


def pack(obj) -> bytes:
    """Encode one Pipe message."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    """Decode one Pipe message."""
    return msgpack.unpackb(data, raw=False)


def layer_bytes(seed: int, layer: int, like: torch.Tensor) -> torch.Tensor:
    """Deterministic random bits shaped like one pool layer, as int32 (any float dtype)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    n = like.numel() * like.element_size() // 4
    return torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=g)


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """A flat int32 view of a contiguous tensor (bitwise compare / fill)."""
    return t.reshape(-1).view(torch.uint8).view(torch.int32)


def _pool(geo: dict, num_blocks: int) -> list[torch.Tensor]:
    shape = (num_blocks, 2, geo["num_kv_heads"], geo["block_size"], geo["head_dim"])
    return [torch.zeros(shape, dtype=DTYPES[geo["dtype"]]) for _ in range(geo["num_layers"])]


class _Common:
    """State both children share: raw pyzmq sockets and the command loop."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.socks: list[zmq.Socket] = []
        self.timeout_s = 30.0

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self.socks.append(s)
        return s

    def _recv(self, sock: zmq.Socket, what: str, copy: bool = True):
        if not sock.poll(int(self.timeout_s * 1000), zmq.POLLIN):
            raise TimeoutError(f"no {what} within {self.timeout_s:.3g} s")
        return sock.recv_multipart(copy=copy)

    def cmd_teardown(self) -> None:
        """Close raw sockets (subclasses also drop transport objects and pools)."""
        for s in self.socks:
            s.close(linger=0)
        self.socks.clear()

    def idle(self) -> float:
        """Work to do while no command is waiting; return how long to wait for one."""
        return 0.5

    def serve(self, conn) -> None:
        """Answer Pipe commands until ``stop``; run :meth:`idle` in between."""
        torch.set_num_threads(1)
        self.conn = conn
        while True:
            if not conn.poll(self.idle()):
                continue
            try:
                name, *args = unpack(conn.recv_bytes())
            except (EOFError, OSError):       # the parent is gone: clean up and leave
                name = "stop"
            if name == "stop":
                self.cmd_teardown()
                try:
                    conn.send_bytes(pack(["ok", None]))
                except OSError:
                    pass
                return
            try:
                conn.send_bytes(pack(["ok", getattr(self, "cmd_" + name)(*args)]))
            except Exception:
                conn.send_bytes(pack(["error", traceback.format_exc()]))


class ReceiverProc(_Common):
    """Decode side: owns a zeroed pool and a Zmq/Shm receiver it keeps polling."""

    def __init__(self) -> None:
        super().__init__()
        self.rx, self.pool = None, []

    def idle(self) -> float:
        if self.rx is None:
            return 0.5
        self.rx.poll(0.002)           # answers HELLO and KV messages promptly
        return 0.0

    def cmd_setup(self, transport: str, geo: dict, num_blocks: int, address: str, timeout_s: float) -> str:
        """Allocate the pool and bind a receiver; return its endpoint."""
        self.cmd_teardown()
        self.timeout_s = timeout_s
        self.pool = _pool(geo, num_blocks)
        kind = "shm" if transport == "shm" else "zmq"
        cls = ShmKVReceiver if kind == "shm" else ZmqKVReceiver
        self.rx = cls(TransportConfig(kind=kind, address=address, timeout_s=timeout_s), self.pool)
        return self.rx.endpoint

    def cmd_reset(self, n: int) -> None:
        """Zero the first ``n`` blocks of every layer (before a verified transfer)."""
        for t in self.pool:
            t[:n].zero_()

    def cmd_expect(self, rid: str, n: int, epoch: int) -> None:
        """Announce blocks ``0..n-1`` for ``rid``."""
        self.rx.expect(rid, list(range(n)), [epoch] * n)

    def cmd_finish(self, rid: str) -> None:
        """Check ``rid`` arrived completely and drop its state."""
        if not self.rx.is_ready(rid):
            raise RuntimeError(f"sender saw an ACK for {rid!r} but the receiver is not ready")
        self.rx.pop_ready()

    def cmd_verify(self, seed: int, n: int) -> bool:
        """Whether blocks ``0..n-1`` hold exactly the sender's seeded bytes."""
        for i, t in enumerate(self.pool):
            got = as_int32(t[:n])
            if not torch.equal(got, layer_bytes(seed, i, t)[:got.numel()]):
                return False
        return True

    def cmd_raw_bind(self, data_addr: str, ack_addr: str) -> list[str]:
        """Bind the raw pyzmq PULL (data) and PUSH (ack) sockets; return their endpoints."""
        self.pull, self.ack = self._socket(zmq.PULL), self._socket(zmq.PUSH)
        self.pull.bind(data_addr)
        self.ack.bind(ack_addr)
        return [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in (self.pull, self.ack)]

    def cmd_raw_serve(self) -> int:
        """Receive one raw multipart message (``copy=False``), ACK it; return its bytes.

        Replies twice: ``["ok", "armed"]`` just before blocking on the socket (so
        the parent starts the sender only then), and the byte count at the end.
        """
        self.conn.send_bytes(pack(["ok", "armed"]))
        frames = self._recv(self.pull, "raw pyzmq message", copy=False)
        self.ack.send(b"k")
        return sum(len(f.buffer) for f in frames)

    def cmd_teardown(self) -> None:
        super().cmd_teardown()
        if self.rx is not None:
            self.rx.close()
        self.rx, self.pool = None, []


class SenderProc(_Common):
    """Prefill side: owns a seeded pool (plain or shared memory) and a Zmq/Shm sender."""

    def __init__(self) -> None:
        super().__init__()
        self.tx, self.shm, self.layers = None, None, []

    def cmd_setup(self, transport: str, geo: dict, num_blocks: int, seed: int, timeout_s: float) -> int:
        """Allocate and fill the pool, build the sender; return the pool bytes."""
        self.cmd_teardown()
        self.timeout_s = timeout_s
        args = (geo["num_layers"], num_blocks, geo["num_kv_heads"], geo["block_size"], geo["head_dim"])
        if transport == "shm":
            self.shm = ShmKVPool.create(*args, dtype=geo["dtype"])
            self.layers = self.shm.layers
        else:
            self.layers = _pool(geo, num_blocks)
        for i, t in enumerate(self.layers):
            as_int32(t).copy_(layer_bytes(seed, i, t))
        kind = "shm" if transport == "shm" else "zmq"
        cfg = TransportConfig(kind=kind, timeout_s=timeout_s)
        plan = ReshardPlan(geo["num_kv_heads"], 1, 1)
        self.tx = (ShmKVSender(cfg, self.shm, plan) if kind == "shm"
                   else ZmqKVSender(cfg, self.layers, plan))
        return sum(t.numel() * t.element_size() for t in self.layers)

    def cmd_connect(self, endpoint: str) -> None:
        """HELLO handshake with the receiver."""
        self.tx.connect(0, endpoint)

    def cmd_send(self, rid: str, n: int, epoch: int, layerwise: bool) -> float:
        """Send blocks ``0..n-1`` (whole, or one message per layer); seconds until ACK."""
        ids, epochs, num_layers = list(range(n)), [epoch] * n, len(self.layers)
        t0 = time.perf_counter()
        if layerwise:
            tid = None
            for layer in range(num_layers):
                tid = self.tx.send(rid, 0, ids, ids, epochs, (layer, layer + 1),
                                   transfer_id=tid, final=layer == num_layers - 1)
        else:
            tid = self.tx.send(rid, 0, ids, ids, epochs)
        self.tx.wait(tid)
        return time.perf_counter() - t0

    def cmd_raw_connect(self, data_ep: str, ack_ep: str) -> None:
        """Connect the raw pyzmq PUSH (data) and PULL (ack) sockets."""
        self.push, self.pull = self._socket(zmq.PUSH), self._socket(zmq.PULL)
        self.push.connect(data_ep)
        self.pull.connect(ack_ep)

    def cmd_raw_send(self, n: int) -> float:
        """Send blocks ``0..n-1`` of every layer as one multipart message; seconds until ack."""
        frames = [as_bytes(t[:n]) for t in self.layers]
        t0 = time.perf_counter()
        self.push.send_multipart(frames, copy=False)
        self._recv(self.pull, "raw pyzmq ack")
        return time.perf_counter() - t0

    def cmd_teardown(self) -> None:
        super().cmd_teardown()
        if self.tx is not None:
            self.tx.close()
        if self.shm is not None:
            self.shm.close()
        self.tx, self.shm, self.layers = None, None, []


def receiver_main(conn) -> None:
    """Entry point of the receiver child."""
    ReceiverProc().serve(conn)


def sender_main(conn) -> None:
    """Entry point of the sender child."""
    SenderProc().serve(conn)

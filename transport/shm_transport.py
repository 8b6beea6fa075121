"""Same-host CPU transport: the receiver copies straight out of the sender's pool.

The prefill rank allocates its KV pool in POSIX shared memory
(:class:`ShmKVPool`, a file in ``/dev/shm`` mapped with ``torch.from_file``).
Only small control messages travel over ZeroMQ (``ipc://``)::

    sender                                   receiver
    HELLO {pool: {kind: shm, name, geometry}} ──▶ maps the pool once per peer
    KV_BLOCKS (src_pool=name, no frames)      ──▶ validates, then for each layer
                                                   dst[dst_ids, :, dst_heads] =
                                                   src[src_ids, :, src_heads]
                                              ◀── ACK  (sender unpins the blocks)

Only the pool's *name* crosses the socket, never a path: the receiver maps
only files named ``disagg-kv-<hex>`` in the shared-memory directory. The
creating process unlinks the file on :meth:`ShmKVPool.close` (or at exit).

A creator that is SIGKILLed cannot unlink, and a supervisor restarting it would
leave one pool's worth of memory behind per crash. So the creator holds an
exclusive ``flock`` on its file for as long as it lives (the kernel drops it
when the process dies, however it dies), and every new pool first sweeps the
files nobody holds (:func:`sweep_stale_pools`). A receiver drops its mapping of
a peer's pool once that pool's file is gone (checked at each new HELLO), or
the mapping alone would keep a dead pool's pages allocated.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
import uuid
import weakref

import torch

from .resharding import copy_blocks
from .messages import ErrorCode, Hello, KVBlocks, WireError
from .wire import DTYPES
from .zmq_sender import ZmqKVSender
from .zmq_transport import ZmqKVReceiver

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_NAME = re.compile(r"^disagg-kv-[0-9a-f]{32}$")
_GEOMETRY = ("num_layers", "num_blocks", "num_kv_heads", "block_size", "head_dim")


log = logging.getLogger(__name__)

STALE_MIN_AGE_S = 60.0    # younger files are never swept: their creator may not hold the lock yet


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _release(path: str, fd: int) -> None:
    """The creator's end: remove the file, then drop its lock."""
    _unlink(path)
    os.close(fd)


def sweep_stale_pools(min_age_s: float = STALE_MIN_AGE_S) -> list[str]:
    """Remove pool files whose creator is gone (nobody holds their lock) and that are
    older than ``min_age_s``; return their names."""
    swept = []
    try:
        names = [n for n in os.listdir(SHM_DIR) if _NAME.match(n)]
    except OSError:
        return swept
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                     # its creator is alive
            _unlink(path)
            swept.append(name)
        finally:
            os.close(fd)
    if swept:
        log.warning("removed %d shared KV pool(s) left by processes that died: %s",
                    len(swept), ", ".join(swept))
    return swept


class ShmKVPool:
    """Per-layer ``(num_blocks, 2, H, B, D)`` KV caches in one shared-memory file."""

    def __init__(self, name: str, num_layers: int, num_blocks: int, num_kv_heads: int,
                 block_size: int, head_dim: int, dtype: str = "float32", create: bool = False) -> None:
        if not _NAME.match(name):
            raise ValueError(f"shared KV pool name {name!r} must look like disagg-kv-<32 hex digits>")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not in {sorted(DTYPES)}")
        dims = (num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim)
        if any(not isinstance(x, int) or x <= 0 for x in dims):
            raise ValueError(f"pool dimensions must be positive ints, got {dims}")
        self.name, self.path, self.dtype = name, os.path.join(SHM_DIR, name), dtype
        self.geometry = dict(zip(_GEOMETRY, (num_layers, num_blocks, num_kv_heads, block_size, head_dim)))
        numel = num_layers * num_blocks * 2 * num_kv_heads * block_size * head_dim
        nbytes = numel * DTYPES[dtype].itemsize
        self._finalizer = None
        if create:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)       # held until this process ends
                os.ftruncate(fd, nbytes)
            except BaseException:
                _release(self.path, fd)
                raise
            self._finalizer = weakref.finalize(self, _release, self.path, fd)
        elif os.path.getsize(self.path) != nbytes:
            raise ValueError(f"shared pool {name} has {os.path.getsize(self.path)} bytes, "
                             f"its announced geometry needs {nbytes}")
        flat = torch.from_file(self.path, shared=True, size=numel, dtype=DTYPES[dtype])
        self.layers: list[torch.Tensor] = list(flat.view(*dims).unbind(0))  # each (N, 2, H, B, D)

    @classmethod
    def create(cls, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
               head_dim: int, dtype: str = "float32") -> "ShmKVPool":
        """Allocate a new zero-filled pool; this process owns (and unlinks) it. Pools
        left by dead processes are swept first."""
        sweep_stale_pools()
        return cls(f"disagg-kv-{uuid.uuid4().hex}", num_layers, num_blocks, num_kv_heads,
                   block_size, head_dim, dtype, create=True)

    @classmethod
    def open(cls, info: dict) -> "ShmKVPool":
        """Map a pool another process created, from its :meth:`info` dict."""
        try:
            return cls(info["name"], *(info[k] for k in _GEOMETRY), info["dtype"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed shared pool description: {exc}") from None

    def info(self) -> dict:
        """A msgpack-able description a peer passes to :meth:`open`."""
        return {"kind": "shm", "name": self.name, "dtype": self.dtype, **self.geometry}

    def close(self) -> None:
        """Drop the mapping; the creator also removes the file."""
        self.layers = []
        if self._finalizer is not None:
            self._finalizer()


class ShmKVSender(ZmqKVSender):
    """Announces blocks of a shared pool; the receiver copies them itself.

    ``pool`` is anything with ``layers``, ``name`` and ``info()`` (a
    :class:`ShmKVPool`, or a CUDA IPC pool in :mod:`transport.cuda_ipc`).
    """

    def __init__(self, config, pool, plan, tp_rank: int = 0, on_release=None, ctx=None) -> None:
        self.pool = pool
        super().__init__(config, pool.layers, plan, tp_rank, on_release, ctx)

    def _pool_info(self) -> dict:
        return self.pool.info()

    def _src_pool_name(self) -> str:
        return self.pool.name

    def _frames(self, msg: KVBlocks, src_heads: list[int]) -> list:
        return []


class ShmKVReceiver(ZmqKVReceiver):
    """Maps each sender's shared pool once (at HELLO) and copies blocks out of it."""

    pool_kind = "shm"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._peer_pools: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def _open_pool(self, info: dict) -> list[torch.Tensor]:
        """Map a peer's pool; return its per-layer tensors."""
        pool = ShmKVPool.open(info)
        self._handles.append(pool)
        return pool.layers

    def _on_hello(self, peer: Hello) -> Hello:
        if not peer.pool:
            return self.hello
        name = peer.pool.get("name")
        if peer.pool.get("kind") != self.pool_kind or not isinstance(name, str):
            raise WireError(ErrorCode.UNKNOWN_POOL, f"expected a {self.pool_kind} pool, got "
                            f"kind {peer.pool.get('kind')!r}")
        if name not in self._peer_pools:
            self._forget_gone_pools()
            try:
                layers = self._open_pool(peer.pool)
            except (ValueError, OSError, RuntimeError) as exc:
                raise WireError(ErrorCode.UNKNOWN_POOL, f"cannot open pool {name!r}: {exc}") from None
            want = (self.limits.num_layers, 2, self.limits.block_size, self.limits.head_dim,
                    DTYPES[self.limits.dtype])
            got = (len(layers), layers[0].shape[1], layers[0].shape[3], layers[0].shape[4],
                   layers[0].dtype)
            if got != want:
                raise WireError(ErrorCode.SHAPE, f"peer pool (layers, 2, block_size, head_dim, "
                                f"dtype) {got} does not match this pool {want}")
            self._peer_pools[name] = layers
        return self.hello

    def _forget_gone_pools(self) -> None:
        """Unmap peer pools whose file was removed (their creator closed or died)."""
        for pool in [p for p in self._handles if not os.path.exists(p.path)]:
            self._peer_pools.pop(pool.name, None)
            self._handles.remove(pool)
            pool.close()

    def _write(self, msg: KVBlocks, frames: list) -> int:
        if not msg.src_pool:
            return super()._write(msg, frames)
        src_pool = self._peer_pools.get(msg.src_pool)
        if src_pool is None:
            raise WireError(ErrorCode.UNKNOWN_POOL, f"pool {msg.src_pool!r} was not announced by a HELLO")
        num_blocks, _, num_heads = src_pool[0].shape[:3]
        if max(msg.src_block_ids) >= num_blocks:
            raise WireError(ErrorCode.BLOCK_ID, f"src block ids must be < {num_blocks}")
        if max(h[0] for h in msg.heads) >= num_heads:
            raise WireError(ErrorCode.HEADS, f"src heads must be < {num_heads}")
        self._check_lease(msg, "before")
        for layer in range(*msg.layers):
            copy_blocks(src_pool[layer], self.kv_caches[layer], list(msg.src_block_ids),
                        list(msg.dst_block_ids), [tuple(h) for h in msg.heads])
        self._sync()
        self._check_lease(msg, "while")
        return msg.total_bytes

    def _sync(self) -> None:
        """Wait until the copies above are complete (a no-op on CPU)."""

    @staticmethod
    def _check_lease(msg: KVBlocks, when: str) -> None:
        """Refuse a copy that did not finish inside the sender's lease (stale KV)."""
        if msg.lease_deadline <= 0 or time.monotonic() >= msg.lease_deadline:
            raise WireError(ErrorCode.LEASE_EXPIRED, f"the sender's lease on these blocks ended "
                            f"{when} the copy; the blocks may have been reused")

    def close(self) -> None:
        super().close()
        self._peer_pools.clear()
        for pool in self._handles:
            pool.close()
        self._handles.clear()

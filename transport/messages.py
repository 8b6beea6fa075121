"""Wire messages: small frozen dataclasses ↔ plain msgpack-able header dicts.

Every message is ``{"v": WIRE_VERSION, "kind": ..., **fields}``. ``from_header``
checks the version, the kind and the type of every field and raises
:class:`WireError` (never ``KeyError``/``TypeError``) on anything malformed;
range checks against a pool live in :func:`transport.wire.validate_kv_header`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

WIRE_VERSION = 1


class Kind:
    """Message kinds (the header's ``kind`` field)."""

    HELLO = "hello"          # handshake: pool geometry (and a shared pool's address)
    KV_BLOCKS = "kv_blocks"  # KV of some blocks for a layer range
    ACK = "ack"              # a KV_BLOCKS message was written
    ERROR = "error"          # a message was rejected (code + message)
    ALL = (HELLO, KV_BLOCKS, ACK, ERROR)


class ErrorCode:
    """Stable error codes carried by ERROR replies and :class:`WireError`."""

    DECODE = "decode_error"            # header is not msgpack / not a dict / too big
    VERSION = "bad_version"
    KIND = "bad_kind"
    FIELD = "bad_field"                # missing field or wrong type
    REQUEST_ID = "bad_request_id"
    LAYER_RANGE = "bad_layer_range"
    BLOCK_COUNT = "bad_block_count"
    BLOCK_ID = "bad_block_id"
    HEADS = "bad_heads"
    DTYPE = "bad_dtype"
    SHAPE = "bad_shape"
    FRAMES = "bad_frame_count"
    FRAME_SIZE = "bad_frame_size"
    TOO_LARGE = "too_large"
    UNKNOWN_REQUEST = "unknown_request"
    NOT_EXPECTED = "block_not_expected"
    EPOCH = "epoch_mismatch"
    UNKNOWN_POOL = "unknown_pool"
    LEASE_EXPIRED = "lease_expired"      # a pool read would end after the sender's lease
    INTERNAL = "internal_error"


class WireError(Exception):
    """A message failed validation; ``code`` is one of :class:`ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def _check(header: dict, name: str, kind: type) -> Any:
    """``header[name]`` if present with type ``kind`` (bools are not ints)."""
    if name not in header:
        raise WireError(ErrorCode.FIELD, f"header field {name!r} is missing")
    value = header[name]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if kind is list:
        ok = isinstance(value, (list, tuple))
    if not ok:
        raise WireError(ErrorCode.FIELD, f"header field {name!r} must be {kind.__name__}, "
                                         f"got {type(value).__name__}")
    return value


def _ints(header: dict, name: str, depth: int = 1) -> tuple:
    """A list of ints (depth 1) or of lists of ints (depth 2) as nested tuples."""
    def conv(v: Any, d: int) -> Any:
        if d == 0:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        elif isinstance(v, (list, tuple)):
            return tuple(conv(x, d - 1) for x in v)
        raise WireError(ErrorCode.FIELD, f"header field {name!r} must be a "
                                         f"{'list of ' * depth}ints")
    return conv(_check(header, name, list), depth)


class _Message:
    """Mixin: dataclass ↔ header dict, with type checks on the way in."""

    KIND = ""

    def to_header(self) -> dict:
        """The msgpack-able header dict (tuples become lists)."""
        return {"v": WIRE_VERSION, "kind": self.KIND,
                **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_header(cls, header: dict) -> Any:
        """Rebuild from a decoded header; raises :class:`WireError` on bad types."""
        check_envelope(header, cls.KIND)
        values = {}
        for f in fields(cls):
            t = f.type if isinstance(f.type, str) else f.type.__name__
            if t.startswith("tuple[tuple"):
                values[f.name] = _ints(header, f.name, 2)
            elif t.startswith("tuple"):
                values[f.name] = _ints(header, f.name)
            else:
                values[f.name] = _check(header, f.name, {"int": int, "str": str, "bool": bool,
                                                         "float": float, "dict": dict}[t])
        return cls(**values)


def check_envelope(header: Any, kind: str | None = None) -> str:
    """Check ``header`` is a dict of this wire version with a known kind; return the kind."""
    if not isinstance(header, dict):
        raise WireError(ErrorCode.DECODE, f"header must be a map, got {type(header).__name__}")
    if header.get("v") != WIRE_VERSION:
        raise WireError(ErrorCode.VERSION, f"wire version {header.get('v')!r} is not supported; "
                                           f"this side speaks version {WIRE_VERSION}")
    got = header.get("kind")
    if got not in Kind.ALL or (kind is not None and got != kind):
        raise WireError(ErrorCode.KIND, f"unexpected message kind {got!r}"
                        + (f" (wanted {kind!r})" if kind else ""))
    return got


@dataclass(frozen=True)
class Hello(_Message):
    """Handshake, both directions: who I am and my pool's geometry.

    ``pool`` describes a pool the peer may read directly (shared memory or a
    CUDA IPC handle); it is empty for plain ZeroMQ transfers.
    """

    KIND = Kind.HELLO
    tp_rank: int
    tp_size: int
    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: str
    pool: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KVBlocks(_Message):
    """KV of ``len(dst_block_ids)`` blocks for layers ``[layers[0], layers[1])``.

    ``heads`` lists ``(src local head, dst local head)`` pairs; frame head ``i``
    goes to dst head ``heads[i][1]``. ``epochs[i]`` is the epoch the receiver
    gave dst block ``dst_block_ids[i]``. With ``src_pool`` set, no frames
    follow: the receiver copies ``src_block_ids`` out of that shared pool, and
    must finish copying before ``lease_deadline`` (``time.monotonic()``, which
    is one clock for every process of a host): after it the sender may reuse
    the blocks, so a later copy is refused instead of delivering stale KV.
    """

    KIND = Kind.KV_BLOCKS
    request_id: str
    transfer_id: str
    seq: int
    final: bool
    layers: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    src_block_ids: tuple[int, ...]
    epochs: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    dtype: str
    frame_shape: tuple[int, ...]
    total_bytes: int
    src_pool: str = ""
    lease_deadline: float = 0.0

    @property
    def num_layers(self) -> int:
        """Layers this message covers."""
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Ack(_Message):
    """KV_BLOCKS message ``seq`` of ``transfer_id`` was written; ``ready``: request complete."""

    KIND = Kind.ACK
    request_id: str
    transfer_id: str
    seq: int
    ready: bool
    bytes_written: int


@dataclass(frozen=True)
class Error(_Message):
    """A message was rejected; ids are empty / -1 when the header was unreadable."""

    KIND = Kind.ERROR
    code: str
    message: str
    request_id: str = ""
    transfer_id: str = ""
    seq: int = -1

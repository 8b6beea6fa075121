"""The wire format: a versioned msgpack header, then raw tensor frames.

One message is one ZeroMQ multipart message::

    frame 0          frame 1 .. N                       (N = last - first layers)
    ┌────────────┐   ┌──────────────────────────────┐
    │ msgpack    │   │ layer `first`:               │  each frame holds the sent
    │ header     │   │ (n_blocks, 2, n_heads, B, D) │  blocks of one layer, only
    │ (dict)     │   │ raw bytes, C order           │  the heads listed in "heads"
    └────────────┘   └──────────────────────────────┘

Headers are msgpack maps of ints, strings, bools and lists (never pickle),
encoded from and decoded into the structs of :mod:`transport.messages` by
``msgspec``. :func:`decode_header` checks the version, the kind and every
field's type; a receiver then calls :func:`validate_kv_header` before it
touches any buffer: every range and every frame length is checked against the
receiver's own pool geometry (:class:`WireLimits`). Failures raise
:class:`WireError` with a stable ``code`` that travels back in an ERROR reply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import msgspec
import torch

from .messages import WIRE_VERSION, Ack, Error, ErrorCode, Hello, KVBlocks, WireError, WireMessage

__all__ = ["MAX_HEADER_BYTES", "MAX_ID_LEN", "DTYPES", "HEADER_TYPES", "WireLimits", "dtype_name",
           "encode", "decode_header", "header_ids", "check_ids", "validate_kv_header"]

MAX_HEADER_BYTES = 1 << 20
MAX_ID_LEN = 256
"""Longest request / transfer id a receiver takes (and echoes in an ERROR reply)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.float32`` → ``"float32"``)."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot travel on the wire; supported: {sorted(DTYPES)}")


HEADER_TYPES = (Hello, KVBlocks, Ack, Error)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Hello | KVBlocks | Ack | Error)


def encode(msg: WireMessage) -> bytes:
    """Pack a message's header with msgpack."""
    return _ENCODER.encode(msg)


def decode_header(buf: Any, accept: tuple[type, ...] = HEADER_TYPES) -> WireMessage:
    """Unpack a header frame into a message of one of the ``accept`` types.

    Raises :class:`WireError` (never anything else), with the code of the first
    check that fails: ``DECODE`` (not msgpack, not a map, too big), ``VERSION``,
    ``KIND`` (unknown, or not in ``accept``), ``FIELD`` (missing or mistyped).
    """
    if len(buf) > MAX_HEADER_BYTES:
        raise WireError(ErrorCode.DECODE, f"header of {len(buf)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = _DECODER.decode(buf)
    except msgspec.ValidationError as exc:       # msgpack, but not a well-formed header
        _check_envelope(_plain(buf), accept)
        raise WireError(ErrorCode.FIELD, f"bad header field: {exc}") from None
    # UnicodeDecodeError: a str that is not UTF-8; RecursionError: nesting too deep (a
    # nesting bomb, e.g. in Hello.pool)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError(ErrorCode.DECODE, f"header is not valid msgpack: {exc}") from None
    if not isinstance(msg, accept):
        _check_envelope({"v": msg.v, "kind": type(msg).__struct_config__.tag}, accept)
    return msg


def _plain(buf: Any) -> Any:
    """``buf`` decoded without a schema (None when even that fails)."""
    try:
        return msgspec.msgpack.decode(buf)
    # TypeError: unhashable map keys; UnicodeDecodeError: a str that is not UTF-8;
    # RecursionError: nesting deeper than msgspec's limit
    except (msgspec.DecodeError, TypeError, UnicodeDecodeError, RecursionError):
        return None


def _check_envelope(header: Any, accept: tuple[type, ...]) -> None:
    """Raise ``DECODE`` / ``VERSION`` / ``KIND`` for a header that fails those checks."""
    if not isinstance(header, dict) or not all(isinstance(k, str) for k in header):
        raise WireError(ErrorCode.DECODE, f"header must be a map with string keys, "
                                          f"got {type(header).__name__}")
    if header.get("v", WIRE_VERSION) != WIRE_VERSION:
        raise WireError(ErrorCode.VERSION, f"wire version {header.get('v')!r} is not supported; "
                                           f"this side speaks version {WIRE_VERSION}")
    kinds = [t.__struct_config__.tag for t in accept]
    if header.get("kind") not in kinds:
        raise WireError(ErrorCode.KIND, f"unexpected message kind {header.get('kind')!r} "
                                        f"(wanted {' / '.join(kinds)})")


def header_ids(buf: Any) -> tuple[str, str, int]:
    """``(request_id, transfer_id, seq)`` from a header frame, however malformed.

    For ERROR replies, so that a sender can fail the right transfer: a missing
    or mistyped id is ``""`` / ``-1``, and ids are cut to :data:`MAX_ID_LEN` characters.
    """
    header = _plain(buf) if len(buf) <= MAX_HEADER_BYTES else None
    header = header if isinstance(header, dict) else {}
    def get(key: str, kind: type, default: Any) -> Any:
        v = header.get(key, default)
        return v if isinstance(v, kind) and not isinstance(v, bool) else default
    return (get("request_id", str, "")[:MAX_ID_LEN], get("transfer_id", str, "")[:MAX_ID_LEN],
            get("seq", int, -1))


@dataclass(frozen=True)
class WireLimits:
    """The receiver's pool geometry and size limits that incoming headers must fit."""

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: str
    max_message_bytes: int
    max_id_len: int = MAX_ID_LEN

    @classmethod
    def for_pool(cls, hello: Hello, max_message_bytes: int) -> WireLimits:
        """The limits of the pool a receiver announces in its HELLO."""
        return cls(hello.num_layers, hello.num_blocks, hello.num_kv_heads, hello.block_size,
                   hello.head_dim, hello.dtype, max_message_bytes)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "dtype" and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"WireLimits.{f.name} must be a positive int, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"WireLimits.dtype {self.dtype!r} not in {sorted(DTYPES)}")

    @property
    def itemsize(self) -> int:
        """Bytes per element of the pool dtype."""
        return DTYPES[self.dtype].itemsize


def check_ids(request_id: str, transfer_id: str, max_len: int = MAX_ID_LEN) -> None:
    """Both ids 1..``max_len`` characters long, else :class:`WireError` (``REQUEST_ID``).

    A receiver refuses longer ones and can echo them only cut (:func:`header_ids`), so a
    sender checks before it sends: an ERROR it could not match would leave the blocks
    pinned until the lease ends.
    """
    for name, v in (("request_id", request_id), ("transfer_id", transfer_id)):
        if not 0 < len(v) <= max_len:
            raise WireError(ErrorCode.REQUEST_ID, f"{name} length {len(v)} not in 1..{max_len}")


def validate_kv_header(msg: KVBlocks, frames: Sequence[Any], limits: WireLimits) -> None:
    """Check a decoded KV_BLOCKS header and its frames against ``limits``.

    Nothing is written before this returns; any failure raises
    :class:`WireError` with the matching :class:`ErrorCode`.
    """
    check_ids(msg.request_id, msg.transfer_id, limits.max_id_len)
    if len(msg.layers) != 2 or not 0 <= msg.layers[0] < msg.layers[1] <= limits.num_layers:
        raise WireError(ErrorCode.LAYER_RANGE, f"layer range {list(msg.layers)} is not "
                        f"[first, last) within 0..{limits.num_layers}")
    n = len(msg.dst_block_ids)
    if n == 0 or len(msg.src_block_ids) != n or len(msg.epochs) != n:
        raise WireError(ErrorCode.BLOCK_COUNT, f"block counts differ or are 0: dst {n}, "
                        f"src {len(msg.src_block_ids)}, epochs {len(msg.epochs)}")
    if any(not 0 <= b < limits.num_blocks for b in msg.dst_block_ids) \
            or len(set(msg.dst_block_ids)) != n or min(msg.src_block_ids) < 0 or min(msg.epochs) < 0:
        raise WireError(ErrorCode.BLOCK_ID, f"dst block ids must be distinct and within "
                        f"0..{limits.num_blocks - 1}; src ids and epochs non-negative")
    dst_heads = [p[1] for p in msg.heads if len(p) == 2]
    if not msg.heads or len(dst_heads) != len(msg.heads) or len(set(dst_heads)) != len(dst_heads) \
            or any(not 0 <= h < limits.num_kv_heads for h in dst_heads) \
            or any(p[0] < 0 for p in msg.heads):
        raise WireError(ErrorCode.HEADS, f"heads must be distinct [src, dst] pairs with dst in "
                        f"0..{limits.num_kv_heads - 1}, got {[list(p) for p in msg.heads]}")
    if msg.dtype != limits.dtype:
        raise WireError(ErrorCode.DTYPE, f"dtype {msg.dtype!r} differs from the pool's {limits.dtype!r}")
    shape = (n, 2, len(msg.heads), limits.block_size, limits.head_dim)
    if msg.frame_shape != shape:
        raise WireError(ErrorCode.SHAPE, f"frame shape {list(msg.frame_shape)} != expected {list(shape)}")
    frame_bytes = n * 2 * len(msg.heads) * limits.block_size * limits.head_dim * limits.itemsize
    if msg.total_bytes != frame_bytes * msg.num_layers:
        raise WireError(ErrorCode.FRAME_SIZE, f"total_bytes {msg.total_bytes} != "
                        f"{msg.num_layers} layers x {frame_bytes} bytes")
    if msg.total_bytes > limits.max_message_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"message of {msg.total_bytes} bytes exceeds the "
                        f"limit of {limits.max_message_bytes} (TransportConfig.max_message_bytes)")
    want_frames = 0 if msg.src_pool else msg.num_layers
    if len(frames) != want_frames:
        raise WireError(ErrorCode.FRAMES, f"{len(frames)} tensor frames, header declares {want_frames}")
    for i, f in enumerate(frames):
        if len(f) != frame_bytes:
            raise WireError(ErrorCode.FRAME_SIZE, f"frame {i} has {len(f)} bytes, expected {frame_bytes}")

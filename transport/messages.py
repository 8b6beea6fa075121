"""Wire messages: frozen ``msgspec`` structs, one tagged union with tag field ``kind``.

Every header is a msgpack map ``{"kind": KIND, **fields, "v": WIRE_VERSION}``.
:func:`transport.wire.decode_header` parses it with one typed decoder over the
union (checking the version, the kind and the type of every field while it
parses) and raises :class:`WireError` on anything malformed; range checks
against a pool live in :func:`transport.wire.validate_kv_header`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

WIRE_VERSION = 1


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


class WireMessage(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    """Base of every header: a frozen struct tagged with its ``kind``; ``v`` is the wire version."""

    v: Literal[WIRE_VERSION] = WIRE_VERSION


class Hello(WireMessage, tag="hello"):
    """Handshake, both directions: who I am and my pool's geometry.

    ``pool`` describes a pool the peer may read directly (shared memory or a
    CUDA IPC handle); it is empty for plain ZeroMQ transfers.
    """

    tp_rank: int
    tp_size: int
    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: str
    pool: dict[str, Any] = {}


class KVBlocks(WireMessage, tag="kv_blocks"):
    """KV of ``len(dst_block_ids)`` blocks for layers ``[layers[0], layers[1])``.

    ``heads`` lists ``(src local head, dst local head)`` pairs; frame head ``i``
    goes to dst head ``heads[i][1]``. ``epochs[i]`` is the epoch the receiver
    gave dst block ``dst_block_ids[i]``. With ``src_pool`` set, no frames
    follow: the receiver copies ``src_block_ids`` out of that shared pool, and
    must finish copying before ``lease_deadline`` (``time.monotonic()``, which
    is one clock for every process of a host): after it the sender may reuse
    the blocks, so a later copy is refused instead of delivering stale KV.
    """

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


class Ack(WireMessage, tag="ack"):
    """KV_BLOCKS message ``seq`` of ``transfer_id`` was written; ``ready``: request complete."""

    request_id: str
    transfer_id: str
    seq: int
    ready: bool
    bytes_written: int


class Error(WireMessage, tag="error"):
    """A message was rejected; ids are empty / -1 when the header was unreadable."""

    code: str
    message: str
    request_id: str = ""
    transfer_id: str = ""
    seq: int = -1

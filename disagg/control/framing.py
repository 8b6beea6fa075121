"""Control frames on a byte stream: a 4-byte big-endian length, then the frame.

ZeroMQ delimits control frames itself; a node's uplink (a plain TCP connection
to its router, :mod:`router.uplinks` and :mod:`disagg.node.uplink`) carries the
same msgpack frames (:mod:`disagg.control.messages`) back to back, each behind
its length::

    | len (4 bytes, big-endian) | frame (len bytes) | len | frame | ...
"""

from __future__ import annotations

import struct

from disagg.control.messages import ControlError

MAX_FRAME_BYTES = 256 << 20     # a longer declared length is a broken or hostile stream
_LEN = struct.Struct("!I")


def framed(frame: bytes) -> bytes:
    """``frame`` behind its length, ready to write to the stream."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ValueError(f"a control frame of {len(frame)} bytes is over the stream's "
                         f"limit of {MAX_FRAME_BYTES}")
    return _LEN.pack(len(frame)) + frame


class FrameReader:
    """Splits a stream's bytes into frames, whatever sizes they arrive in."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by ``data`` (in order); raises :class:`ControlError` on a
        declared length over ``MAX_FRAME_BYTES`` (the stream cannot be resynchronised)."""
        buf = self._buf
        buf += data
        frames, at = [], 0
        while len(buf) - at >= 4:
            (n,) = _LEN.unpack_from(buf, at)
            if n > MAX_FRAME_BYTES:
                raise ControlError(f"a stream frame declares {n} bytes, over the limit of "
                                   f"{MAX_FRAME_BYTES}")
            if len(buf) - at - 4 < n:
                break
            frames.append(bytes(buf[at + 4:at + 4 + n]))
            at += 4 + n
        del buf[:at]
        return frames

    @property
    def pending(self) -> int:
        """Bytes held of a frame not complete yet."""
        return len(self._buf)

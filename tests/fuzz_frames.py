"""Seeded hostile frames for the socket fuzz tests (``tests/test_fuzz_sockets.py``).

One ``random.Random(seed)`` drives everything, so a failure replays from its
seed. :meth:`FrameFuzzer.next` returns one multipart message, drawn by
:data:`KINDS` weight from:

- ``garbage``: random bytes (0..96, sometimes a few KiB), bytes msgpack never
  starts with, an empty frame;
- ``bomb``: msgpack that claims far more than it holds (array / map / str / bin /
  ext of 2**32-1 entries), or nests thousands of levels deep (msgspec then
  raises ``RecursionError``, not ``DecodeError``);
- ``truncate`` / ``flip`` / ``splice``: a valid message's encoding cut short,
  with bits flipped, or with random bytes spliced in;
- ``retype`` / ``drop`` / ``extra`` / ``tag``: a valid message's map with one
  field given a value of another type, one field dropped, one added, or its
  tag (``type`` / ``kind``) changed;
- ``valid``: a well-typed message with hostile values (the target's own
  generator: negative and huge ids, NaN, unknown request ids ...);

and any of them, one time in ten, with frames added, dropped or split (the
wrong frame count).
"""

from __future__ import annotations

import math
import random
import string
from typing import Any, Callable, Sequence

import msgspec

HOSTILE_INTS = (-1, 0, 1, 2, -2**63, 2**63 - 1, 2**64 - 1, 2**31, 2**32, 10**12, -10**12, 49152)
HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, -1.0)
ODD_CHARS = "\x00\x7f é😀\u202e\ufeff/:*[]{}"
ALPHABET = string.ascii_letters + ODD_CHARS
KINDS = {"garbage": 8, "bomb": 4, "truncate": 8, "flip": 10, "splice": 4, "retype": 14,
         "drop": 5, "extra": 4, "tag": 5, "valid": 38}


class Hostile:
    """Values that fit msgpack (ints in int64/uint64, UTF-8 strings) but not sense."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self) -> int:
        """A hostile int (extremes, negatives, off-by-ones) or a random one."""
        r = self.rng
        return r.choice(HOSTILE_INTS) if r.random() < 0.6 else r.randint(-1000, 100_000)

    def float(self) -> float:
        """A hostile float (NaN, infinities, extremes) or a random one."""
        r = self.rng
        return r.choice(HOSTILE_FLOATS) if r.random() < 0.6 else r.uniform(-1e6, 1e6)

    def str(self) -> str:
        """Empty, long, or odd characters."""
        r = self.rng
        pick = r.random()
        if pick < 0.15:
            return ""
        if pick < 0.17:
            return "x" * (r.randint(257, 4096) if pick < 0.1695 else 70_000)
        return "".join(r.choices(ALPHABET, k=r.randint(1, 12)))

    def one_of(self, *makers: Callable[[], Any]) -> Any:
        """The value of one of ``makers``, picked at random (only that one runs)."""
        return self.rng.choice(makers)()

    def ints(self) -> list[int]:
        """A list of hostile ints (sometimes long)."""
        if self.rng.random() < 0.03:
            return list(self.rng.randbytes(20_000))
        return [self.int() for _ in range(self.rng.choice((0, 1, 2, 5, 17)))]

    def value(self, depth: int = 0) -> Any:
        """Any msgpack value, nested up to three levels."""
        r = self.rng
        pick = r.randrange(10 if depth < 3 else 8)
        if pick == 0:
            return self.int()
        if pick == 1:
            return self.float()
        if pick == 2:
            return self.str()
        if pick == 3:
            return r.randbytes(r.randint(0, 16))
        if pick == 4:
            return r.choice((True, False))
        if pick == 5:
            return None
        if pick in (6, 7):
            return self.ints()
        if pick == 8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.str(): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def dict(self) -> dict[str, Any]:
        """A map with string keys and hostile values."""
        return {self.str(): self.value(1) for _ in range(self.rng.randint(0, 5))}

    # ---- raw bytes ------------------------------------------------------------
    def garbage(self) -> bytes:
        """Random bytes, an empty frame, or bytes no msgpack value starts with."""
        r = self.rng
        pick = r.random()
        if pick < 0.1:
            return b""
        if pick < 0.2:
            return bytes([0xc1]) * r.randint(1, 8)
        return r.randbytes(r.randint(1, 96) if r.random() < 0.95 else r.randint(97, 8192))

    def bomb(self) -> bytes:
        """A length that lies (2**32-1 entries, few bytes) or nesting thousands deep."""
        r = self.rng
        if r.random() < 0.5:
            head = r.choice((b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9", b"\xdc", b"\xde"))
            return head + b"\xff\xff\xff\xff"[: 2 if head in (b"\xdc", b"\xde") else 4] \
                + r.randbytes(r.randint(0, 8))
        depth = r.choice((200, 1500, 5000))
        if r.random() < 0.5:                       # nested inside a message's map
            prefix = r.choice((b"\x82\xa4type\xa8Generate\xa6params",
                               b"\x82\xa4kind\xa5hello\xa4pool", b""))
        else:
            prefix = b""
        return prefix + r.choice((b"\x91", b"\x81\xa1a")) * depth + b"\xc0"

    def mutate_bytes(self, buf: bytes, how: str) -> bytes:
        """``buf`` truncated, bit-flipped or spliced (``how``)."""
        r = self.rng
        if not buf:
            return self.garbage()
        if how == "truncate":
            return buf[:r.randrange(len(buf))]
        out = bytearray(buf)
        if how == "flip":
            for _ in range(r.choice((1, 1, 2, 3, 8))):
                out[r.randrange(len(out))] ^= 1 << r.randrange(8)
            return bytes(out)
        at = r.randrange(len(out) + 1)
        cut = r.randint(0, 4)
        return bytes(out[:at]) + r.randbytes(r.randint(0, 8)) + bytes(out[at + cut:])


Valid = Callable[[Hostile], tuple[dict, list[bytes]]]
"""A target's generator of one well-typed message with hostile values: its header as a
builtins map and the frames that follow it (none for control messages)."""


class FrameFuzzer:
    """Hostile multipart messages from a target's well-typed ``valid`` generator.

    ``tag_key`` is the field naming the message type (``"type"`` for control
    messages, ``"kind"`` for KV headers) and ``tags`` the names a ``tag``
    mutation picks from (plus random strings and non-strings).
    """

    def __init__(self, seed: int, valid: Valid,
                 tag_key: str, tags: Sequence[str]) -> None:
        self.rng = random.Random(seed)
        self.h = Hostile(self.rng)
        self._valid = valid
        self.tag_key, self.tags = tag_key, list(tags)
        self._kinds, self._weights = list(KINDS), list(KINDS.values())
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def next(self) -> list[bytes]:
        """One hostile message (one or more frames)."""
        r, h = self.rng, self.h
        kind = r.choices(self._kinds, self._weights)[0]
        self.counts[kind] += 1
        header, tail = self._valid(h)
        if kind == "garbage":
            parts = [h.garbage()]
        elif kind == "bomb":
            parts = [h.bomb()]
        elif kind in ("truncate", "flip", "splice"):
            parts = [h.mutate_bytes(encode(header), kind), *tail]
        elif kind == "valid":
            parts = [encode(header), *tail]
        else:
            parts = [encode(self._mutate_map(dict(header), kind)), *tail]
        if r.random() < 0.1:
            parts = self._reframe(parts)
        return parts

    def _mutate_map(self, d: dict, how: str) -> dict:
        r, h = self.rng, self.h
        keys = [k for k in d if k != self.tag_key] or [self.tag_key]
        if how == "retype":
            key = r.choice(keys)
            d[key] = h.value()
        elif how == "drop":
            d.pop(r.choice(keys + [self.tag_key]), None)
        elif how == "extra":
            d[r.choice((h.str(), r.choice(keys)))] = h.value()
            if r.random() < 0.2:
                return {**d, r.randint(0, 5): 1}         # a key that is not a string
        else:
            d[self.tag_key] = r.choice(self.tags) if r.random() < 0.6 else h.value()
        return d

    def _reframe(self, parts: list[bytes]) -> list[bytes]:
        """The wrong number of frames: some added, the last dropped, or one split in two."""
        r, h = self.rng, self.h
        pick = r.random()
        if pick < 0.4:
            return parts + [h.garbage() for _ in range(r.randint(1, 3))]
        if pick < 0.6 and len(parts) > 1:
            return parts[:-1]
        if pick < 0.8:
            return [parts[0], parts[0], *parts[1:]]
        buf = parts[0]
        at = r.randint(0, len(buf))
        return [buf[:at], buf[at:], *parts[1:]]


def encode(header: dict) -> bytes:
    """msgpack of a builtins map (the way every header and control frame is encoded)."""
    return msgspec.msgpack.encode(header)


def builtins(msg: msgspec.Struct) -> dict:
    """A message struct as the plain map its frame encodes (its tag field included)."""
    return msgspec.to_builtins(msg)

"""Block identity: chained, process-stable hashes of full KV blocks.

A prompt is cut into blocks of ``block_size`` tokens. Each *full* block gets a
hash that covers its own token ids, any extra keys (a LoRA id, a multimodal
content hash, ...) and the hash of the block before it, so a block hash
identifies the whole prefix that ends with that block::

    tokens:  | t0 .. t15 | t16 .. t31 | t32 .. t47 | t48 t49 t50 |
    hashes:     h0           h1           h2          (partial: none)
    h0 = H(None, t0..t15,  extra)
    h1 = H(h0,   t16..t31, extra)
    h2 = H(h1,   t32..t47, extra)

``H`` is BLAKE2b (8-byte digest) over the msgpack encoding of
``(parent, token_ids, extra_keys)``. It depends on neither Python's hash seed
nor the platform, so the router and every engine process compute the same
64-bit integers for the same prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack

_DIGEST_BYTES = 8  # 64-bit hashes fit msgpack's uint64 and a Python int


def _digest(parent: int | None, tokens: list[int], extra_keys: tuple) -> int:
    """Hash one already-normalised block (no argument checks)."""
    try:
        payload = msgpack.packb((parent, tokens, extra_keys), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            f"block hash inputs must be msgpack-encodable ints/str/bytes/tuples; "
            f"got extra_keys={extra_keys!r} ({exc})") from exc
    return int.from_bytes(hashlib.blake2b(payload, digest_size=_DIGEST_BYTES).digest(), "big")


def _check_parent(parent: int | None) -> None:
    """Reject parents that are not a 64-bit unsigned block hash."""
    if parent is not None and not (isinstance(parent, int) and 0 <= parent < 1 << 64):
        raise ValueError(f"parent must be None or a 64-bit unsigned block hash, got {parent!r}")


def hash_block(parent: int | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """Return the 64-bit hash of one full block.

    ``parent`` is the previous block's hash (``None`` for the first block),
    ``token_ids`` the block's tokens and ``extra_keys`` anything else that makes
    the KV different for the same tokens (e.g. a LoRA id). Token ids are
    converted with ``int()``, so numpy or torch integer scalars hash the same
    as Python ints.
    """
    _check_parent(parent)
    return _digest(parent, [int(t) for t in token_ids], tuple(extra_keys))


def split_full_blocks(token_ids: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """Cut ``token_ids`` into tuples of ``block_size`` tokens, dropping a partial tail.

    These tuples are what :meth:`BlockPool.match_prefix` and
    :meth:`BlockPool.cache_block` compare against to guard against collisions.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    tokens = [int(t) for t in token_ids]
    return [tuple(tokens[i:i + block_size])
            for i in range(0, len(tokens) - block_size + 1, block_size)]


def hash_blocks(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (),
                parent: int | None = None) -> list[int]:
    """Return the chained hashes of the FULL blocks of ``token_ids``.

    A trailing partial block gets no hash, so ``len(result) ==
    len(token_ids) // block_size``. ``parent`` continues a chain (the hash of
    the block just before ``token_ids[0]``); ``extra_keys`` apply to every
    block.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    _check_parent(parent)
    extra = tuple(extra_keys)
    tokens = [int(t) for t in token_ids]
    hashes: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = _digest(parent, tokens[start:start + block_size], extra)
        hashes.append(parent)
    return hashes

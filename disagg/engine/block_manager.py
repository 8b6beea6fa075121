"""Per-request block bookkeeping on top of the shared :class:`BlockPool`.

The pool only knows blocks; this class knows which blocks a request holds,
which of its full blocks are cached, and how a new request's leading blocks
are matched against the prefix cache::

    request tokens:  [ blk0 full ][ blk1 full ][ blk2 full ][ blk3 part ]
    prefix cache:    [   hit    ][   hit    ][   miss   ]
    -> reuse blk0, blk1 (ref_count += 1), compute from token 2*block_size on
"""

from __future__ import annotations

from disagg.engine.request import Request
from disagg.kv_cache.block_pool import BlockPool
from disagg.kv_cache.hashing import hash_block


class BlockManager:
    """Allocates, caches and frees the blocks of requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_caching)
        self._num_cached: dict[str, int] = {}   # request id -> leading blocks registered as cached

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_hashes(self, req: Request) -> list[int]:
        """Extend ``req.block_hashes`` to cover every full block of its tokens."""
        bs, hashes = self.block_size, req.block_hashes
        for i in range(len(hashes), req.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, req.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, req: Request, leave_one: bool = True) -> list:
        """Cached blocks matching ``req``'s leading full blocks (not yet taken).

        With ``leave_one`` at least one token is left to compute, since the
        step that computes the last token is the one that samples.
        """
        if not self.enable_caching:
            return []
        hashes = self.update_hashes(req)
        bs = self.block_size
        token_blocks = [tuple(req.token_ids[i * bs:(i + 1) * bs]) for i in range(len(hashes))]
        hits = self.pool.match_prefix(hashes, token_blocks)
        if leave_one and hits and len(hits) * bs >= req.num_tokens:
            hits = hits[:-1]
        return hits

    def can_allocate(self, req: Request, num_tokens: int, prefix: list = ()) -> bool:
        """Whether ``req`` can hold ``num_tokens`` tokens after taking ``prefix``."""
        needed = self.blocks_needed(num_tokens) - len(req.blocks) - len(prefix)
        revived = sum(1 for b in prefix if b.ref_count == 0)   # leave the free queue
        return max(needed, 0) + revived <= self.pool.num_free_blocks

    def allocate(self, req: Request, num_tokens: int, prefix: list = ()) -> bool:
        """Give ``req`` blocks for ``num_tokens`` tokens, reusing ``prefix`` first."""
        if not self.can_allocate(req, num_tokens, prefix):
            return False
        if prefix:
            self.pool.touch(prefix)
            req.blocks.extend(prefix)
            self._num_cached[req.request_id] = len(prefix)
        needed = self.blocks_needed(num_tokens) - len(req.blocks)
        if needed > 0:
            req.blocks.extend(self.pool.allocate(needed))
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_caching:
            return
        bs = self.block_size
        done = min(req.num_computed_tokens // bs, len(req.blocks))
        start = self._num_cached.get(req.request_id, 0)
        if done <= start:
            return
        hashes = self.update_hashes(req)
        for i in range(start, done):
            self.pool.cache_block(req.blocks[i], hashes[i], tuple(req.token_ids[i * bs:(i + 1) * bs]))
        self._num_cached[req.request_id] = done

    def free(self, req: Request) -> None:
        """Return the request's blocks (tail first, so its head stays cached longest)."""
        if req.blocks:
            self.pool.free(reversed(req.blocks))
        req.blocks = []
        self._num_cached.pop(req.request_id, None)

    def cached_prefix_blocks(self, token_ids: list[int]) -> list[int]:
        """Hook 3: hashes of the leading full blocks of ``token_ids`` held here."""
        if not self.enable_caching:
            return []
        bs, parent, out = self.block_size, None, []
        for i in range(len(token_ids) // bs):
            blk = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = hash_block(parent, blk)
            if self.pool.lookup(parent, blk) is None:
                break
            out.append(parent)
        return out

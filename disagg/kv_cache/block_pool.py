"""The block pool: KV block ids, reference counts and the prefix cache.

The pool owns block *ids* only; the tensors live with the model runner. Every
block is either in use (``ref_count > 0``) or in the free queue. A free block
may still carry a hash: its KV stays valid and reusable until ``allocate``
hands it out again, which evicts the hash first::

    free queue (OrderedDict, O(1) remove by id)     hash map (block_hash -> Block)
    head = evicted first               tail
    +----+----+----+----+----+                      h(A0) -> #7   (in use, ref 2)
    | #3 | #9 | #5 | #2 | #4 |  <- free() appends     h(A1) -> #2   (free, cached)
    +----+----+----+----+----+                      h(B0) -> #4   (free, cached)
      ^ allocate() pops here
      #3, #9, #5: no hash;  #2, #4: cached, revived by touch() on a prefix hit

A request frees its blocks in *reverse* order (tail first), so its last
blocks sit nearer the head and are evicted before the shared prefix blocks.

Invariants (checked by :meth:`BlockPool.check_invariants`): a block is in the
free queue iff ``ref_count == 0``; ``block.block_hash is not None`` iff the
hash map maps that hash to this very block; a cached block keeps the tokens it
was cached with so that look-ups compare tokens, not only hashes.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Block:
    """One KV block's bookkeeping (identity-compared; the pool owns every instance)."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    epoch: int = 0  # +1 each time allocate() hands the block out


class NoFreeBlocksError(RuntimeError):
    """Raised by :meth:`BlockPool.allocate` when too few blocks are free."""


class BlockPool:
    """Reference-counted KV block ids with an LRU-evicted prefix cache (see module doc)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._cached: dict[int, Block] = {}
        self.num_queried_blocks = 0  # blocks asked about by match_prefix
        self.num_hit_blocks = 0      # of those, blocks found cached

    # ----------------------------------------------------------------- stats
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_count == 0``, cached (evictable) ones included."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ``ref_count > 0``."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in ``[0, 1]``."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the hash map (in use or free)."""
        return len(self._cached)

    @property
    def hit_rate(self) -> float:
        """``num_hit_blocks / num_queried_blocks`` over all match_prefix calls (0 if none)."""
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0

    # ------------------------------------------------------------- lifetime
    def get(self, block_id: int) -> Block:
        """Return the block with id ``block_id``."""
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is out of range [0, {self.num_blocks})")
        return self._blocks[block_id]

    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` blocks from the head of the free queue (least recently freed first).

        A taken block that is still cached loses its hash first. Each returned
        block has ``ref_count == 1`` and a bumped ``epoch``. Raises
        :class:`NoFreeBlocksError`, allocating nothing, if fewer than ``n`` are free.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"allocate needs a non-negative block count, got {n!r}")
        if n > len(self._free):
            raise NoFreeBlocksError(
                f"need {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free")
        taken = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            block.epoch += 1
            taken.append(block)
        return taken

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue tail.

        Blocks are appended in the order given, so pass a request's blocks in
        reverse to have its tail evicted before its (possibly shared) head.
        Raises ``ValueError``, changing nothing, on a double free (more frees
        of a block than it has references) or a block from another pool.
        """
        blocks = list(blocks)
        for block_id, count in Counter(self._own(b).block_id for b in blocks).items():
            block = self._blocks[block_id]
            if count > block.ref_count:
                raise ValueError(
                    f"double free of block {block_id}: ref_count is {block.ref_count} "
                    f"but {count} free(s) were requested")
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    def touch(self, blocks: Iterable[Block]) -> None:
        """Add one reference to each block, taking free ones out of the free queue.

        This is how a prefix-cache hit revives a cached free block, and how a
        second request shares a block already in use.
        """
        blocks = [self._own(b) for b in blocks]
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    # ---------------------------------------------------------- prefix cache
    def cache_block(self, block: Block, block_hash: int, token_ids: Sequence[int]) -> bool:
        """Register a full, in-use block under ``block_hash``; return True if it is now cached.

        If the hash already maps to another block, that mapping is kept and
        this block stays uncached (False). Re-caching a block under its own
        hash is a no-op (True). Does nothing (False) when caching is disabled.
        """
        self._own(block)
        if block.ref_count == 0:
            raise ValueError(
                f"block {block.block_id} is free; only blocks in use can be cached "
                f"(a free block may be reallocated at any time)")
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise ValueError(
                    f"block {block.block_id} is already cached under hash "
                    f"{block.block_hash:#x}, cannot re-cache it under {block_hash:#x}")
            return True
        if not self.enable_caching or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(int(t) for t in token_ids)
        self._cached[block_hash] = block
        return True

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> Block | None:
        """Return the cached block for ``block_hash`` if its tokens equal ``token_ids``.

        Comparing tokens guards against hash collisions. Does not touch the
        block: call :meth:`touch` to take a reference.
        """
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def match_prefix(self, block_hashes: Sequence[int],
                     token_blocks: Sequence[Sequence[int]]) -> list[Block]:
        """Return the longest run of leading cached blocks (stops at the first miss).

        ``token_blocks[i]`` are the tokens of the block hashed as
        ``block_hashes[i]``. The blocks are NOT touched; the caller touches
        the ones it keeps. Updates the hit/query counters.
        """
        if len(block_hashes) != len(token_blocks):
            raise ValueError(f"match_prefix got {len(block_hashes)} hashes but "
                             f"{len(token_blocks)} token blocks; they must pair up")
        hits: list[Block] = []
        for block_hash, tokens in zip(block_hashes, token_blocks):
            block = self.lookup(block_hash, tokens)
            if block is None:
                break
            hits.append(block)
        self.num_queried_blocks += len(block_hashes)
        self.num_hit_blocks += len(hits)
        return hits

    def reset_prefix_cache(self) -> int:
        """Drop the hashes of all free blocks and return how many were dropped.

        Blocks in use keep their hashes (their owners still rely on them).
        """
        dropped = [b for b in self._free.values() if b.block_hash is not None]
        for block in dropped:
            self._evict(block)
        return len(dropped)

    # -------------------------------------------------------------- helpers
    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks in eviction order (head first); for stats and debugging."""
        return list(self._free)

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` if the pool's bookkeeping is inconsistent (for tests)."""
        for block in self._blocks:
            if (block.ref_count == 0) != (block.block_id in self._free) or block.ref_count < 0:
                raise RuntimeError(f"block {block.block_id}: ref_count {block.ref_count} "
                                   f"disagrees with free-queue membership")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise RuntimeError(f"block {block.block_id} has a hash the map does not hold")
            if (block.block_hash is None) != (block.token_ids is None):
                raise RuntimeError(f"block {block.block_id}: hash and token_ids out of step")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash:
                raise RuntimeError(f"hash map entry {block_hash:#x} points at block "
                                   f"{block.block_id} whose hash is {block.block_hash}")

    def _own(self, block: Block) -> Block:
        """Return ``block`` if it belongs to this pool, else raise ``ValueError``."""
        if not (isinstance(block, Block) and 0 <= block.block_id < self.num_blocks
                and self._blocks[block.block_id] is block):
            raise ValueError(f"{block!r} does not belong to this block pool")
        return block

    def _evict(self, block: Block) -> None:
        """Remove ``block`` from the hash map and clear its hash and tokens."""
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None

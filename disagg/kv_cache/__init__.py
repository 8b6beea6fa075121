"""KV cache bookkeeping: block hashing and the reference-counted block pool."""

from __future__ import annotations

from disagg.kv_cache.block_pool import Block, BlockPool, NoFreeBlocksError
from disagg.kv_cache.hashing import hash_block, hash_blocks, split_full_blocks

__all__ = ["Block", "BlockPool", "NoFreeBlocksError", "hash_block", "hash_blocks",
           "split_full_blocks"]

"""The router's guess of what each node's prefix cache holds.

The router sees every prompt it sends, so it can remember the block hashes
(:func:`disagg.kv_cache.hashing.hash_blocks`, the same chained hashes the
engines use) it sent to each node, newest last, up to the node's block
count. Looking a prompt up costs one dict probe per leading block — no
round trip to the node. It is a guess (the node may have evicted blocks, or
kept some longer): it steers routing only. What actually moves is decided by
the decode node's real cache (``KVTarget.num_cached_tokens``).
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    """An LRU set of block hashes per node."""

    def __init__(self) -> None:
        self._nodes: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}

    def add_node(self, node_id: str, capacity_blocks: int) -> None:
        """Start (or restart, empty) tracking ``node_id`` holding up to ``capacity_blocks``."""
        if capacity_blocks < 1:
            raise ValueError(f"{node_id}: capacity_blocks must be >= 1, got {capacity_blocks!r}")
        self._nodes[node_id] = OrderedDict()
        self._capacity[node_id] = capacity_blocks

    def remove_node(self, node_id: str) -> None:
        """Forget ``node_id`` (it died or left; its cache is gone)."""
        self._nodes.pop(node_id, None)
        self._capacity.pop(node_id, None)

    def match(self, node_id: str, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` ``node_id`` probably holds."""
        table = self._nodes.get(node_id)
        if table is None:
            return 0
        n = 0
        for h in hashes:
            if h not in table:
                break
            n += 1
        return n

    def insert(self, node_id: str, hashes: list[int]) -> None:
        """``node_id`` now holds ``hashes`` (most recently used); evict the oldest past capacity.

        A prompt's leading blocks are marked newest, so when its blocks age out
        the tail goes first: a match counts leading blocks only.
        """
        table = self._nodes.get(node_id)
        if table is None:
            return
        for h in reversed(hashes):
            table[h] = None
            table.move_to_end(h)
        while len(table) > self._capacity[node_id]:
            table.popitem(last=False)

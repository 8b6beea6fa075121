"""Tests for block hashing and the reference-counted block pool (CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.kv_cache.block_pool import BlockPool, NoFreeBlocksError
from disagg.kv_cache.hashing import hash_block, hash_blocks, split_full_blocks

BS = 4


# ------------------------------------------------------------------ hashing
def test_hash_is_chained():
    tokens = list(range(4 * BS))
    base = hash_blocks(tokens, BS)
    changed = hash_blocks([999] + tokens[1:], BS)
    assert all(a != b for a, b in zip(base, changed))  # block 0 changes every later hash
    late = hash_blocks(tokens[:-1] + [999], BS)
    assert late[:-1] == base[:-1] and late[-1] != base[-1]
    assert base[1] == hash_block(base[0], tokens[BS:2 * BS])
    assert hash_blocks(tokens[BS:], BS, parent=base[0]) == base[1:]


def test_hash_is_64_bit_int_and_sensitive_to_extra_keys():
    tokens = list(range(2 * BS))
    plain = hash_blocks(tokens, BS)
    lora = hash_blocks(tokens, BS, extra_keys=("lora", 7))
    assert all(isinstance(h, int) and 0 <= h < 1 << 64 for h in plain + lora)
    assert all(a != b for a, b in zip(plain, lora))
    assert hash_blocks(tokens, BS, extra_keys=("lora", 8)) != lora
    assert hash_blocks(tokens, BS, extra_keys=("lora", 7)) == lora


def test_partial_blocks_are_not_hashed():
    assert hash_blocks(list(range(BS - 1)), BS) == []
    full = hash_blocks(list(range(3 * BS)), BS)
    assert hash_blocks(list(range(3 * BS + BS - 1)), BS) == full
    assert split_full_blocks(list(range(2 * BS + 1)), BS) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_hash_input_errors():
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks([1, 2, 3], 0)
    with pytest.raises(ValueError, match="parent"):
        hash_block(-1, [1, 2])
    with pytest.raises(ValueError, match="extra_keys"):
        hash_block(None, [1, 2], extra_keys=(object(),))


def test_hash_is_stable_across_processes():
    tokens = list(range(100, 100 + 5 * BS + 2))
    code = ("import json; from disagg.kv_cache.hashing import hash_blocks; "
            f"print(json.dumps(hash_blocks({tokens!r}, {BS}, extra_keys=('a', 1))))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert json.loads(out.stdout) == hash_blocks(tokens, BS, extra_keys=("a", 1))


# -------------------------------------------------------------- block pool
def test_allocate_free_and_ref_counts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_count for b in a] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    pool.touch(a[:1])
    pool.free(a)
    assert a[0].ref_count == 1 and pool.num_free_blocks == 3
    pool.free(a[:1])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    assert pool.get(2) is a[2]
    with pytest.raises(ValueError, match="out of range"):
        pool.get(4)


def test_double_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, a])
    assert b.ref_count == 1 and pool.num_free_blocks == 1
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, b])
    other = BlockPool(2).allocate(1)[0]
    with pytest.raises(ValueError, match="does not belong"):
        pool.free([other])


def test_no_free_blocks_leaves_pool_unchanged():
    pool = BlockPool(3)
    held = pool.allocate(2)
    before = pool.free_block_ids()
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.free_block_ids() == before and pool.num_free_blocks == 1
    assert [b.ref_count for b in held] == [1, 1]
    pool.check_invariants()


def test_lru_eviction_order_and_reverse_free():
    pool = BlockPool(6)
    req1 = pool.allocate(3)   # blocks 0, 1, 2
    req2 = pool.allocate(3)   # blocks 3, 4, 5
    pool.free(reversed(req2))  # freed first -> evicted first; tail (5) before head (3)
    pool.free(reversed(req1))
    assert pool.free_block_ids() == [5, 4, 3, 2, 1, 0]
    assert [b.block_id for b in pool.allocate(2)] == [5, 4]


def test_cached_free_block_is_found_and_revived_by_touch():
    pool = BlockPool(4)
    tokens = split_full_blocks(list(range(2 * BS)), BS)
    hashes = hash_blocks(list(range(2 * BS)), BS)
    blocks = pool.allocate(2)
    for blk, h, t in zip(blocks, hashes, tokens):
        assert pool.cache_block(blk, h, t)
    pool.free(reversed(blocks))
    assert pool.num_cached_blocks == 2 and pool.num_free_blocks == 4
    hit = pool.match_prefix(hashes, tokens)
    assert hit == blocks and all(b.ref_count == 0 for b in hit)  # not touched
    pool.touch(hit)
    assert [b.ref_count for b in hit] == [1, 1] and pool.num_free_blocks == 2
    assert pool.num_hit_blocks == 2 and pool.num_queried_blocks == 2
    epochs = [b.epoch for b in blocks]
    pool.free(hit)
    assert [b.epoch for b in blocks] == epochs  # revival is not reuse
    pool.check_invariants()


def test_match_prefix_stops_at_first_miss():
    pool = BlockPool(4)
    toks = list(range(3 * BS))
    hashes, tblocks = hash_blocks(toks, BS), split_full_blocks(toks, BS)
    blocks = pool.allocate(3)
    pool.cache_block(blocks[0], hashes[0], tblocks[0])
    pool.cache_block(blocks[2], hashes[2], tblocks[2])
    assert pool.match_prefix(hashes, tblocks) == [blocks[0]]
    assert pool.num_queried_blocks == 3 and pool.num_hit_blocks == 1
    with pytest.raises(ValueError, match="pair up"):
        pool.match_prefix(hashes, tblocks[:2])


def test_eviction_removes_hash_and_bumps_epoch():
    pool = BlockPool(1)
    (blk,) = pool.allocate(1)
    assert blk.epoch == 1
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(blk, h, (1, 2, 3, 4))
    pool.free([blk])
    assert pool.lookup(h, (1, 2, 3, 4)) is blk
    (again,) = pool.allocate(1)
    assert again is blk and blk.epoch == 2
    assert blk.block_hash is None and blk.token_ids is None
    assert pool.lookup(h, (1, 2, 3, 4)) is None and pool.num_cached_blocks == 0


def test_token_guard_rejects_forged_collision():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(a, h, (9, 9, 9, 9))  # forged: the hash does not belong to these tokens
    assert pool.lookup(h, (1, 2, 3, 4)) is None
    assert pool.match_prefix([h], [(1, 2, 3, 4)]) == []
    assert pool.cache_block(b, h, (1, 2, 3, 4)) is False  # existing mapping kept
    assert b.block_hash is None and pool.lookup(h, (9, 9, 9, 9)) is a


def test_cache_block_rules_and_reset():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, 11, (1,)) and pool.cache_block(a, 11, (1,))
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_block(a, 12, (1,))
    pool.cache_block(b, 22, (2,))
    pool.free([a])
    with pytest.raises(ValueError, match="is free"):
        pool.cache_block(a, 11, (1,))
    assert pool.reset_prefix_cache() == 1  # only the free block's hash goes
    assert pool.lookup(11, (1,)) is None and pool.lookup(22, (2,)) is b
    off = BlockPool(2, enable_caching=False)
    (c,) = off.allocate(1)
    assert off.cache_block(c, 5, (5,)) is False and off.lookup(5, (5,)) is None
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


# ------------------------------------------------------- property test
_ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch", "cache", "hit", "reset"]),
                          st.integers(0, 5), st.integers(0, 3)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, num_blocks=st.integers(1, 8))
def test_random_operations_keep_invariants(ops, num_blocks):
    pool = BlockPool(num_blocks)
    held: list = []  # one entry per reference we own
    for op, x, y in ops:
        if op == "alloc":
            free_before = pool.num_free_blocks
            try:
                held += pool.allocate(x)
            except NoFreeBlocksError:
                assert x > free_before and pool.num_free_blocks == free_before
        elif op == "free" and held:
            drop = held[-(x % len(held) + 1):]
            del held[-len(drop):]
            pool.free(reversed(drop))
        elif op == "touch" and held:
            blk = held[x % len(held)]
            pool.touch([blk])
            held.append(blk)
        elif op == "cache" and held:
            blk = held[x % len(held)]
            if blk.block_hash is None:  # small hash space forces collisions
                pool.cache_block(blk, y, (y, x))
        elif op == "hit":
            blk = pool.lookup(y, (y, x))
            if blk is not None:
                pool.touch([blk])
                held.append(blk)
        elif op == "reset":
            pool.reset_prefix_cache()
        _check(pool, held)


def _check(pool: BlockPool, held: list) -> None:
    pool.check_invariants()
    refs = Counter(b.block_id for b in held)
    free_ids = set(pool.free_block_ids())
    assert pool.num_free_blocks + len(refs) == pool.num_blocks
    assert not free_ids & set(refs)  # nothing both free and referenced
    for i in range(pool.num_blocks):
        assert pool.get(i).ref_count == refs.get(i, 0)
    cached = [pool.get(i) for i in range(pool.num_blocks) if pool.get(i).block_hash is not None]
    assert pool.num_cached_blocks == len(cached)
    for blk in cached:
        assert pool.lookup(blk.block_hash, blk.token_ids) is blk

"""The driver's KV block pool and the prefix cache's block names (engine/kv_blocks.py)."""

from __future__ import annotations

import pytest

from qwen_vl_distributed.engine.kv_blocks import BlockPool, MediaSpan, OutOfBlocks, block_name, name_blocks


def test_a_block_name_stands_for_its_whole_prefix_and_its_media():
    a = block_name(None, [1, 2, 3, 4], [])
    assert a == block_name(None, [1, 2, 3, 4], [])
    assert block_name(a, [5, 6, 7, 8], []) != block_name(block_name(None, [9, 2, 3, 4], []), [5, 6, 7, 8], [])
    img = MediaSpan(1, 3, b"pixels-1")
    with_img = block_name(None, [1, 2, 3, 4], [img])
    assert with_img != a and with_img != block_name(None, [1, 2, 3, 4], [MediaSpan(1, 3, b"pixels-2")])


def test_name_blocks_names_only_full_blocks_and_extends_what_is_there():
    tokens = list(range(11))
    media = [MediaSpan(2, 6, b"img")]  # spans blocks 0 and 1
    names: list[bytes] = []
    name_blocks(lambda a, b: tokens[a:b], 11, media, 4, names)
    assert len(names) == 2
    assert names[1] == block_name(names[0], tokens[4:8], media)
    more = list(names)
    name_blocks(lambda a, b: tokens[a:b] + [0] * (b - len(tokens)), 12, media, 4, more)
    assert more[:2] == names and len(more) == 3


def test_pool_hands_out_never_named_blocks_before_named_ones_then_least_recently_used():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    pool.name(a[0], b"a0")
    pool.name(a[1], b"a1")
    pool.release(a)  # named: freed last to first, the tail first in line for eviction
    assert pool.num_free == 4 and pool.lookup([b"a0", b"a1"]) == a
    b = pool.allocate(2)
    assert set(b).isdisjoint(a)  # the never-named ones first
    c = pool.allocate(1)
    assert c == [a[1]] and pool.lookup([b"a0", b"a1"]) == [a[0]]  # a's tail evicted, its name gone
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)


def test_pool_shares_a_block_between_holders_and_frees_it_with_the_last():
    pool = BlockPool(3, 2)
    (x,) = pool.allocate(1)
    pool.name(x, b"x")
    pool.acquire(pool.lookup([b"x"]))  # a second holder
    pool.release([x])
    assert pool.num_free == 2 and pool.free_among([x]) == 0
    pool.release([x])
    assert pool.num_free == 3 and pool.free_among([x]) == 1
    pool.acquire([x])  # taken back from the free list by a cache hit
    assert pool.num_free == 2 and pool.refs[x] == 1


def test_a_name_already_cached_keeps_its_block_and_caching_off_names_nothing():
    pool = BlockPool(3, 2)
    x, y = pool.allocate(2)
    pool.name(x, b"n")
    pool.name(y, b"n")  # the same prefix computed twice: the first block keeps the name
    assert pool.lookup([b"n"]) == [x] and y not in pool.name_of
    off = BlockPool(3, 2, caching=False)
    (z,) = off.allocate(1)
    off.name(z, b"n")
    assert off.lookup([b"n"]) == []

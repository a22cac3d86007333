from tandem.kvcache.block_pool import BlockPool
from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def test_new_blocks_come_from_lru_end_and_refcounts_track_sharing():
    pool = BlockPool(4, block_size=2)
    a = pool.get_new_blocks(2)
    assert a == [0, 1] and pool.num_free_blocks == 2
    pool.touch([a[0]])
    assert pool.blocks[a[0]].ref_cnt == 2
    pool.free_blocks([a[0]])
    assert pool.num_free_blocks == 2, "still referenced once"
    pool.free_blocks(reversed(a))
    assert pool.num_free_blocks == 4
    # 1 and 0 hold nothing cached, so they are handed out first (in the order freed), then 2, 3.
    assert pool.get_new_blocks(4) == [1, 0, 2, 3]


def test_freed_blocks_without_a_cached_hash_are_reused_before_cached_ones_are_evicted():
    pool = BlockPool(4, block_size=2)
    cached = pool.get_new_blocks(2)
    pool.cache_blocks(cached, [10, 20], parent_hash=None)
    pool.free_blocks(reversed(cached))
    (partial,) = pool.get_new_blocks(1)  # the never-used blocks go first anyway
    (dup,) = pool.get_new_blocks(1)
    pool.cache_blocks([dup], [10], parent_hash=None)  # a duplicate stays private, unhashed
    pool.free_blocks([partial, dup])
    pool.take_events()
    assert sorted(pool.get_new_blocks(2)) == sorted([partial, dup])
    assert pool.lookup(10) is not None and pool.lookup(20) is not None, "nothing cached was evicted"
    assert pool.take_events() == []
    assert pool.get_new_blocks(1) == [cached[1]], "then LRU over cached blocks: the tail first"


def test_cached_block_survives_free_and_is_evicted_only_when_reused():
    pool = BlockPool(2, block_size=2)
    (b,) = pool.get_new_blocks(1)
    pool.cache_blocks([b], [111], parent_hash=None)
    pool.free_blocks([b])
    assert pool.lookup(111) == b, "a freed block keeps its hash until handed out"
    pool.touch([b])
    assert pool.num_free_blocks == 1
    pool.free_blocks([b])
    pool.take_events()
    pool.get_new_blocks(2)
    assert pool.lookup(111) is None
    events = pool.take_events()
    assert events == [BlockRemoved(event_id=1, block_hashes=[111])]


def test_events_are_numbered_and_carry_parents():
    pool = BlockPool(8, block_size=2)
    blocks = pool.get_new_blocks(3)
    pool.cache_blocks(blocks[:2], [10, 20], parent_hash=None)
    pool.cache_blocks(blocks[2:], [30], parent_hash=20)
    assert pool.take_events() == [
        BlockStored(event_id=0, block_hashes=[10, 20], parent_hash=None, block_size=2),
        BlockStored(event_id=1, block_hashes=[30], parent_hash=20, block_size=2),
    ]
    assert pool.dump() == [(10, None), (20, 10), (30, 20)]


def test_duplicate_hash_is_not_registered_twice():
    pool = BlockPool(4, block_size=2)
    a, b = pool.get_new_blocks(2)
    pool.cache_blocks([a], [5], parent_hash=None)
    pool.cache_blocks([b], [5], parent_hash=None)
    assert pool.lookup(5) == a
    assert len(pool.take_events()) == 1
    pool.free_blocks([b])
    pool.get_new_blocks(3)  # reusing b must not evict a's hash
    assert pool.lookup(5) == a


def test_reset_only_when_idle():
    pool = BlockPool(2, block_size=2)
    (b,) = pool.get_new_blocks(1)
    pool.cache_blocks([b], [7], None)
    assert not pool.reset_prefix_cache()
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.lookup(7) is None
    assert isinstance(pool.take_events()[-1], AllBlocksCleared)

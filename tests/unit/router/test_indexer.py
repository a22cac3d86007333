from tandem.kvcache.block_pool import BlockPool
from tandem.kvcache.hashing import block_hashes
from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheDump
from tandem.router.indexer import KvIndexer


def stored(i, hashes, parent=None):
    return BlockStored(event_id=i, block_hashes=hashes, parent_hash=parent, block_size=4)


def test_overlap_depth_per_worker():
    idx = KvIndexer()
    idx.apply_events("A", [stored(0, [1, 2, 3])])
    idx.apply_events("B", [stored(0, [1, 2]), stored(1, [9], parent=2)])
    assert idx.find_matches([1, 2, 3, 4]) == {"A": 3, "B": 2}
    assert idx.find_matches([1, 2, 9]) == {"A": 2, "B": 3}
    assert idx.find_matches([7, 1]) == {}, "overlap counts leading blocks only"


def test_superset_holders_do_not_extend_a_shorter_match():
    idx = KvIndexer()
    idx.apply_events("A", [stored(0, [1, 2, 3])])
    idx.apply_events("B", [stored(0, [2, 3])])  # B holds later blocks without the first
    assert idx.find_matches([1, 2, 3]) == {"A": 3}


def test_remove_and_clear():
    idx = KvIndexer()
    idx.apply_events("A", [stored(0, [1, 2, 3]), BlockRemoved(event_id=1, block_hashes=[3])])
    assert idx.find_matches([1, 2, 3]) == {"A": 2}
    idx.apply_events("A", [AllBlocksCleared(event_id=2)])
    assert idx.find_matches([1]) == {} and idx.num_blocks == 0


def test_gap_marks_stale_and_dump_resyncs():
    idx = KvIndexer()
    assert idx.apply_events("A", [stored(0, [1])])
    assert not idx.apply_events("A", [stored(5, [2], parent=1)]), "events 1..4 were lost"
    assert idx.is_stale("A")
    idx.apply_dump("A", KvCacheDump(last_event_id=9, block_size=4, blocks=[(1, None), (8, 1)]))
    assert not idx.is_stale("A")
    assert idx.find_matches([1, 8]) == {"A": 2}
    assert idx.find_matches([1, 2]) == {"A": 1}, "the dump replaced what the lost events left"
    assert idx.apply_events("A", [stored(9, [77]), stored(10, [8], parent=1)]), "old ids are skipped"


def test_purge_removes_worker_everywhere():
    idx = KvIndexer()
    idx.apply_events("A", [stored(0, [1, 2])])
    idx.apply_events("B", [stored(0, [1, 2])])
    idx.remove_worker("A")
    assert idx.find_matches([1, 2]) == {"B": 2}
    assert idx.workers() == ["B"] and idx.num_entries == 2


def test_index_follows_a_real_block_pool():
    """Events from the engine's own block pool keep the index equal to the pool's cached set."""
    pool = BlockPool(4, block_size=2)
    idx = KvIndexer()
    tokens = [1, 2, 3, 4, 5, 6]
    hashes = block_hashes(tokens, 2)
    blocks = pool.get_new_blocks(3)
    pool.cache_blocks(blocks, hashes, None)
    pool.free_blocks(reversed(blocks))
    pool.get_new_blocks(2)  # evicts the oldest free blocks: the unused one, then the tail block
    idx.apply_events("w", pool.take_events())
    assert idx.find_matches(hashes) == {"w": 2}
    assert {h for h, _ in pool.dump()} == set(hashes[:2])

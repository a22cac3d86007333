import struct

import xxhash

from tandem.kvcache.hashing import HASH_SEED, block_hashes, chain_hash, extend_block_hashes, local_block_hash


def test_local_hash_is_xxh3_over_le_u32_with_seed_1337():
    tokens = [1, 2, 3, 70000]
    expected = xxhash.xxh3_64_intdigest(struct.pack("<4I", *tokens), seed=1337)
    assert HASH_SEED == 1337
    assert local_block_hash(tokens) == expected


def test_chain_hash_first_block_is_local_hash_and_rest_cover_parent():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    hashes = block_hashes(a + b + [9, 10], block_size=4)
    assert len(hashes) == 2, "a trailing partial block is not hashed"
    assert hashes[0] == local_block_hash(a)
    parent_then_local = struct.pack("<QQ", hashes[0], local_block_hash(b))
    assert hashes[1] == xxhash.xxh3_64_intdigest(parent_then_local, seed=1337)
    assert chain_hash(hashes[0], local_block_hash(b)) == hashes[1]


def test_same_block_under_different_prefix_gets_different_hash():
    assert block_hashes([1, 1, 2, 2], 2)[1] != block_hashes([3, 3, 2, 2], 2)[1]


def test_extend_block_hashes_matches_full_computation():
    tokens = list(range(37))
    hashes: list[int] = []
    for n in range(len(tokens) + 1):
        extend_block_hashes(hashes, tokens[:n], 8)
    assert hashes == block_hashes(tokens, 8)

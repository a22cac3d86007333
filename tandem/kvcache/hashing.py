"""Chained block hashes over token ids: the names that workers and the router share for KV blocks.

The scheme is NVIDIA Dynamo's, so that Tandem and Dynamo name the same block with the same 64-bit id:

    local_hash[i] = XXH3_64(token_ids[i*B:(i+1)*B] as little-endian uint32, seed=1337)
    seq_hash[0]   = local_hash[0]
    seq_hash[i]   = XXH3_64(le_u64(seq_hash[i-1]) || le_u64(local_hash[i]), seed=1337)

Only full blocks are hashed. `seq_hash[i]` covers every token of blocks 0..i, so two requests share
block i's KV exactly when their `seq_hash[i]` are equal.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from itertools import accumulate

import xxhash

HASH_SEED = 1337

_U32_LE_IS_NATIVE = array("I").itemsize == 4 and struct.pack("=I", 1) == struct.pack("<I", 1)
_PAIR = struct.Struct("<QQ")


def _u32_le_bytes(tokens: Sequence[int]) -> bytes:
    if _U32_LE_IS_NATIVE:
        return array("I", tokens).tobytes()
    return struct.pack(f"<{len(tokens)}I", *tokens)


def local_block_hash(tokens: Sequence[int]) -> int:
    """Hash of one block's token ids alone (no parent)."""
    return xxhash.xxh3_64_intdigest(_u32_le_bytes(tokens), seed=HASH_SEED)


def chain_hash(parent: int | None, local: int) -> int:
    """Sequence hash of a block given its parent's sequence hash (None for the first block)."""
    if parent is None:
        return local
    return xxhash.xxh3_64_intdigest(_PAIR.pack(parent, local), seed=HASH_SEED)


def block_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Sequence hashes of every full block of `tokens` (a trailing partial block is not hashed).

    On the router's hot path (an 8k-token prompt is 512 blocks of 16): the tokens are packed once
    and hashed one slice per block, and the chain is one `accumulate`: ~2.5x the plain loop.
    """
    n = len(tokens) // block_size
    if n == 0:
        return []
    step = 4 * block_size
    buf = _u32_le_bytes(tokens[: n * block_size])
    h = xxhash.xxh3_64_intdigest
    local = [h(buf[i : i + step], HASH_SEED) for i in range(0, n * step, step)]
    return list(accumulate(local[1:], chain_hash, initial=chain_hash(parent, local[0])))


def extend_block_hashes(hashes: list[int], tokens: Sequence[int], block_size: int) -> None:
    """Append the hashes of blocks of `tokens` that became full since `hashes` was last extended."""
    full = len(tokens) // block_size
    if full <= len(hashes):
        return
    parent = hashes[-1] if hashes else None
    start = len(hashes) * block_size
    hashes.extend(block_hashes(tokens[start : full * block_size], block_size, parent))

"""KV-cache events that an engine publishes and the router indexes.

Each event carries `event_id`, numbered from 0 and increasing by one per engine, so a consumer sees a
gap as a jump in ids and asks the worker for a full dump (`KvCacheDump`). Block ids are the chained
sequence hashes of `tandem.kvcache.hashing`.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Consecutive blocks of one sequence were computed and are now reusable.

    `parent_hash` is the block just before `block_hashes[0]` in that sequence (None at the start).
    """

    event_id: int
    block_hashes: list[int]
    parent_hash: int | None
    block_size: int


class BlockRemoved(msgspec.Struct, tag="removed", frozen=True):
    """These blocks were evicted and are no longer reusable on this engine."""

    event_id: int
    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag="cleared", frozen=True):
    """Every cached block was dropped (reset of the prefix cache)."""

    event_id: int


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvCacheDump(msgspec.Struct, frozen=True):
    """Every reusable block an engine holds, as (hash, parent hash) pairs, valid as of `last_event_id`."""

    last_event_id: int
    block_size: int
    blocks: list[tuple[int, int | None]]


KvEventSink = Callable[[list[KvEvent]], None]
"""Receives the events of one engine step, in order. Must not block."""

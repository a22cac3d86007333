"""Block pool: the fixed set of KV blocks, their reference counts and the prefix-cache map.

    free queue (LRU, oldest first)        cached: seq_hash -> block id
    [b7 b2 b9 ... b4]  <- freed blocks     {h(A): b7, h(AB): b2, ...}
     ^ evicted first     appended here

A block with ref_cnt 0 sits in the free queue but keeps its hash: until it is handed out again it can
be revived by a prefix hit (`touch`). Handing it out evicts the hash and emits `BlockRemoved`. A freed
block that holds no cached prefix (a partial tail, a duplicate of a block cached elsewhere, a chunk
never computed) joins the front of the queue instead: it is reused before any cached block is evicted,
so eviction is LRU over cached blocks only (as Dynamo's mocker does; vLLM queues both kinds together).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent


class Block:
    __slots__ = ("block_hash", "block_id", "parent_hash", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.parent_hash: int | None = None


class BlockPool:
    """Owns every block; hands out free ones, revives cached ones, and records KV events."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        assert num_blocks > 0, "a block pool needs at least one block"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}
        self._pending_events: list[KvEvent] = []
        self._next_event_id = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks referenced by live requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[int]:
        """Take `n` blocks from the LRU end of the free queue (evicting their cached hashes)."""
        assert n <= len(self._free), f"asked for {n} blocks with {len(self._free)} free"
        out: list[int] = []
        removed: list[int] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                    removed.append(block.block_hash)
                block.block_hash = None
                block.parent_hash = None
            block.ref_cnt = 1
            out.append(block_id)
        if removed:
            self._emit_removed(removed)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on blocks found by a prefix hit, reviving them from the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop a reference; blocks that reach zero join the free queue in the order given: cached
        blocks at its MRU end, blocks without a cached hash at its front (reused first).

        Callers pass a request's blocks tail first, so a sequence's last blocks are evicted before
        its first ones (the shared prefix lives longest).
        """
        empty: list[int] = []
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"block {block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    empty.append(block_id)
        for block_id in reversed(empty):
            self._free.move_to_end(block_id, last=False)

    def cache_blocks(self, block_ids: list[int], hashes: list[int], parent_hash: int | None) -> None:
        """Register full, computed blocks under their sequence hashes and emit one `BlockStored`.

        A hash already held by another block is left with that block (the duplicate stays private
        to its request and is freed normally); the event then names only newly cached hashes, but
        always with the right parent.
        """
        if not self.enable_caching:
            return
        stored: list[int] = []
        first_parent = parent_hash
        prev = parent_hash
        for block_id, h in zip(block_ids, hashes, strict=True):
            block = self.blocks[block_id]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                block.parent_hash = prev
                self._cached[h] = block_id
                if not stored:
                    first_parent = prev
                stored.append(h)
            elif stored:
                self._emit_stored(stored, first_parent)
                stored = []
            prev = h
        if stored:
            self._emit_stored(stored, first_parent)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.parent_hash = None
        self._cached.clear()
        self._pending_events.append(AllBlocksCleared(event_id=self._take_event_id()))
        return True

    def dump(self) -> list[tuple[int, int | None]]:
        """Every cached (hash, parent hash) in caching order. A parent may be absent: it was evicted first."""
        out = []
        for h, block_id in self._cached.items():
            out.append((h, self.blocks[block_id].parent_hash))
        return out

    @property
    def last_event_id(self) -> int:
        return self._next_event_id - 1

    def take_events(self) -> list[KvEvent]:
        events, self._pending_events = self._pending_events, []
        return events

    def _take_event_id(self) -> int:
        self._next_event_id += 1
        return self._next_event_id - 1

    def _emit_stored(self, hashes: list[int], parent: int | None) -> None:
        self._pending_events.append(
            BlockStored(
                event_id=self._take_event_id(),
                block_hashes=hashes,
                parent_hash=parent,
                block_size=self.block_size,
            )
        )

    def _emit_removed(self, hashes: list[int]) -> None:
        self._pending_events.append(BlockRemoved(event_id=self._take_event_id(), block_hashes=hashes))

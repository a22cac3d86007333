"""KV-cache manager: maps each request to its blocks and keeps the prefix cache up to date.

It never touches tensors: it hands out block ids, which an executor turns into slots of its KV
tensors (the built-in engine) or only counts (the simulated one). One instance serves one engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.request import Request
from tandem.kvcache.block_pool import BlockPool
from tandem.protocol.kv_events import KvCacheDump, KvEvent


@dataclass(frozen=True)
class PrefixHit:
    """Blocks of a request's prefix that this engine already holds (not yet referenced)."""

    block_ids: list[int]
    num_tokens: int


NO_HIT = PrefixHit([], 0)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self._blocks: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request: Request) -> PrefixHit:
        """Longest run of the request's full blocks already cached here.

        At least one token is always left to compute (the last prompt token must run through the
        model to produce logits), so a fully cached prompt hits all but its last block.
        """
        if not self.enable_prefix_caching:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hit.append(block_id)
        return PrefixHit(hit, len(hit) * self.block_size)

    def can_allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        return self._num_new_blocks(request, num_new_tokens, hit) <= self._num_available(hit)

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> list[int] | None:
        """Reference `hit`'s blocks and add blocks for `num_new_tokens` more tokens beyond
        `request.num_computed_tokens + hit.num_tokens`. Returns the new block ids, or None (and
        changes nothing) when too few blocks are free."""
        if not hit.block_ids:
            # Fast path, taken by nearly every decode step: the blocks held already cover the step.
            held = self._blocks.get(request.request_id)
            if (
                held is not None
                and len(held) * self.block_size >= request.num_computed_tokens + num_new_tokens
            ):
                return []
        need = self._num_new_blocks(request, num_new_tokens, hit)
        if need > self._num_available(hit):
            return None
        blocks = self._blocks.setdefault(request.request_id, [])
        if hit.block_ids:
            assert not blocks, "a prefix hit applies only to a request without blocks"
            self.pool.touch(hit.block_ids)
            blocks.extend(hit.block_ids)
            self._num_hashed[request.request_id] = len(hit.block_ids)
        new = self.pool.get_new_blocks(need) if need > 0 else []
        blocks.extend(new)
        return new

    def cache_computed_blocks(self, request: Request, num_tokens: int | None = None) -> None:
        """Register the request's full blocks whose KV is now computed (emits `BlockStored`);
        with `num_tokens`, those among its first `num_tokens` tokens (KV the running step writes)."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        computed = request.num_computed_tokens if num_tokens is None else num_tokens
        start = self._num_hashed.get(rid, 0)
        # Cheap exit first: called for every scheduled request every step, it rarely has work.
        if computed < (start + 1) * self.block_size:
            return
        done = min(computed, request.num_tokens) // self.block_size
        done = min(done, len(request.block_hashes))
        if done <= start:
            return
        blocks = self._blocks[rid]
        parent = request.block_hashes[start - 1] if start > 0 else None
        self.pool.cache_blocks(blocks[start:done], request.block_hashes[start:done], parent)
        self._num_hashed[rid] = done

    def free(self, request: Request) -> None:
        """Release every block of the request, tail first (so a shared prefix is evicted last)."""
        blocks = self._blocks.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def take_events(self) -> list[KvEvent]:
        return self.pool.take_events()

    def dump(self) -> KvCacheDump:
        return KvCacheDump(
            last_event_id=self.pool.last_event_id, block_size=self.block_size, blocks=self.pool.dump()
        )

    def _num_new_blocks(self, request: Request, num_new_tokens: int, hit: PrefixHit) -> int:
        have = len(self._blocks.get(request.request_id, ())) + len(hit.block_ids)
        total_tokens = request.num_computed_tokens + hit.num_tokens + num_new_tokens
        return max(0, self.blocks_needed(total_tokens) - have)

    def _num_available(self, hit: PrefixHit) -> int:
        # Hit blocks that sit in the free queue are about to be revived: they can't also be new ones.
        revived = sum(1 for b in hit.block_ids if self.pool.blocks[b].ref_cnt == 0)
        return self.pool.num_free_blocks - revived

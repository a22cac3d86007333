"""Dense integer slots for worker ids, so that per-worker state can live in bitmasks and arrays.

The indexer keeps each block's holders as one Python int with bit `slot` set per holder, and the
KV router keeps each worker's load at index `slot` of numpy arrays. Scoring a 1,000-worker fleet is
then a handful of array operations instead of 1,000 Python objects per decision.

Slots of workers that left are reused (lowest first), so masks stay as wide as the fleet is now,
not as wide as every worker ever seen.
"""

from __future__ import annotations

import heapq

import numpy as np


class WorkerSlots:
    def __init__(self) -> None:
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        """Slots in use or free: every mask bit and array index is below this."""
        return len(self._ids)

    def __contains__(self, worker: object) -> bool:
        return worker in self._slot

    def slot(self, worker: str) -> int:
        """The worker's slot, assigned on first sight."""
        s = self._slot.get(worker)
        if s is None:
            if self._free:
                s = heapq.heappop(self._free)
                self._ids[s] = worker
            else:
                s = len(self._ids)
                self._ids.append(worker)
            self._slot[worker] = s
        return s

    def get(self, worker: str) -> int | None:
        return self._slot.get(worker)

    def worker(self, slot: int) -> str:
        w = self._ids[slot]
        assert w is not None, f"slot {slot} is free"
        return w

    def release(self, worker: str) -> None:
        """Free the worker's slot for reuse. The caller has cleared every mask bit and array entry."""
        s = self._slot.pop(worker, None)
        if s is not None:
            self._ids[s] = None
            heapq.heappush(self._free, s)


def mask_slots(mask: int) -> list[int] | np.ndarray:
    """The set bits of `mask`, lowest first: a loop for a few bits, numpy for many."""
    if mask.bit_count() <= 16:
        out = []
        while mask:
            low = mask & -mask
            out.append(low.bit_length() - 1)
            mask ^= low
        return out
    raw = np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(raw, bitorder="little"))

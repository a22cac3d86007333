"""LoadBoard: each router's load per worker, shared by the frontend processes of one host.

With `tandem serve --frontends N`, N processes accept on one port and each routes its own requests.
A least-loaded pick needs every router's count, not one router's share: two routers that each split
their 8 requests 4/4 can still leave one worker with 9 and the other with 7, and a worker with 9
cannot keep one batch (see docs/benchmarks.md, session 13). So each router writes its own counts to
a row of a small shared-memory table, and adds the other rows to its own when it picks (the KV
router likewise for the KV blocks and queued prefill tokens it weighs).

Layout (native int64s): a header (`generation`), a column table (one worker-id hash per column, 0
when free), one `ready` word per row (the port of that frontend's own listener) and one row of
loads per frontend (FIELDS per worker: requests, KV blocks, queued prefill tokens).

    [generation][hash x columns][ready x rows][load x rows x columns x FIELDS]

Who writes what: the owner (the `tandem serve` process) assigns columns to workers as they come and
go, and bumps `generation`; each router writes only its own row and its own `ready` word. So no
two processes write one word, and no lock is needed. A router writes the absolute load of its
own requests (not +1/-1), and rewrites its whole row when the column table changes, so a
column handed to a new worker carries no stale count for longer than one of that router's updates.

Why by hand: the standard library's `multiprocessing.shared_memory` registers the segment with a
resource tracker in every attaching process (before 3.13 each one unlinks it at exit); an unlinked
/dev/shm file opened through /proc/<pid>/fd leaves nothing behind however the owner dies.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
WORD = 8
DEFAULT_COLUMNS = 4096
FIELDS = ("requests", "blocks", "queued_prefill_tokens")
"""What a router publishes per worker: its in-flight requests there, the KV blocks they hold (the
KV router's measure; 0 for other policies) and their prompt tokens still waiting for prefill."""
Load = tuple[int, int, int]
_PYTHON_SUMS = 32
"""Up to this many workers, `LoadBoard.others_requests` sums in Python; past it, with numpy."""


def _size(rows: int, columns: int) -> int:
    return WORD * (1 + columns + rows + rows * columns * len(FIELDS))


def worker_key(worker_id: str) -> int:
    """A stable, nonzero 63-bit key for a worker id (Python's `hash` differs per process)."""
    digest = hashlib.blake2b(worker_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**63 - 1)) | 1


class LoadBoard:
    """One process's view of the board: the owner's (`create`) or a router's (`attach`)."""

    def __init__(self, path: str, rows: int, columns: int, row: int, *, owner_fd: int = -1) -> None:
        if rows < 1 or columns < 1:
            raise ValueError("a load board needs at least one row and one column")
        self._check_row(row, rows)
        self.path = path
        self.row = row
        """The row this process's router writes."""
        self.rows = rows
        self.columns = columns
        self._owner_fd = owner_fd
        size = _size(rows, columns)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")
        self._hashes = 1
        self._ready = 1 + columns
        self._base = 1 + columns + rows
        """The word index of the first load cell: (row, column, field) is at
        `_base + (row * columns + column) * len(FIELDS) + field`."""
        self._other_rows = [r * columns * len(FIELDS) for r in range(rows) if r != row]
        """Word offsets (from `_base`) of the rows of the other routers."""
        self._cells = np.frombuffer(
            self._map, np.int64, rows * columns * len(FIELDS), WORD * (1 + columns + rows)
        ).reshape(rows, columns, len(FIELDS))
        """Each row's loads: rows x columns x FIELDS."""
        self._generation = -1
        self._columns: dict[int, int] = {}
        """worker key -> column, as of `_generation`."""
        self._by_id: dict[str, int | None] = {}
        """worker id -> column (None: no column), as of `_generation`."""
        self._row_generation = -1
        """The generation this router's row was last rewritten for."""
        self._cursor = -1
        """The owner: the column it gave out last."""
        self._held: dict[int, int] = {}
        """The owner: worker key -> column, as it wrote them (only the owner writes the table)."""
        self._gather: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        """worker ids -> their columns and which have none (`others` reads the same lists)."""

    @classmethod
    def create(cls, rows: int, columns: int = DEFAULT_COLUMNS, row: int = 0) -> LoadBoard:
        """A zeroed board in an unlinked /dev/shm file that lives while this process (or a router
        that attached) has it open; the other routers `attach(board.path, rows, columns, row)`."""
        created = SHM_DIR / f"tandem-load-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(created, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _size(rows, columns))
        finally:
            created.unlink()
        return cls(f"/proc/{os.getpid()}/fd/{fd}", rows, columns, row, owner_fd=fd)

    @classmethod
    def attach(cls, path: str, rows: int, columns: int, row: int) -> LoadBoard:
        return cls(path, rows, columns, row)

    def close(self) -> None:
        del self._cells  # the map cannot close while an array looks into it
        self._words.release()
        self._map.close()
        if self._owner_fd >= 0:
            os.close(self._owner_fd)
            self._owner_fd = -1

    # -- the owner -------------------------------------------------------------------------------

    def assign(self, worker_ids: Iterable[str]) -> None:
        """Give each of `worker_ids` a column, free the columns of workers not in it, and bump the
        generation if anything changed. Columns of workers that stay are never moved.

        Called on every registry change, and a load report from any worker is one (each worker's
        every `load_interval`), in the process that also serves requests: so an unchanged set costs
        one set comparison, and a change touches only the columns it moves. (A scan of the whole
        column table here took ~1 ms of the event loop four times a second with two workers.)"""
        wanted = {worker_key(w) for w in worker_ids}
        held = self._held
        if wanted == held.keys():
            return
        words, base = self._words, self._hashes
        changed = False
        for key in [k for k in held if k not in wanted]:
            words[base + held.pop(key)] = 0
            changed = True
        # Free columns are taken in turn from after the last one given out, so a column that was
        # just freed goes back into use only after all the others: by then every router has
        # rewritten its row, and no count of the old worker is read as the new one's.
        n = self.columns
        for key in wanted - held.keys():
            if len(held) >= n:
                break  # more workers than columns: the rest are routed on local counts only
            column = next(c for c in ((self._cursor + 1 + i) % n for i in range(n)) if not words[base + c])
            words[base + column] = key
            held[key] = self._cursor = column
            changed = True
        if changed:
            words[0] += 1

    def clear_row(self, row: int) -> None:
        """Forget a router that stopped (its requests died with it)."""
        self._check_row(row, self.rows)
        self._words[self._ready + row] = 0
        self._cells[row] = 0

    def ready_rows(self) -> int:
        return sum(1 for r in range(self.rows) if self._words[self._ready + r])

    def peers(self) -> list[tuple[int, int]]:
        """The other ready routers: (row, the 127.0.0.1 port of their process's own listener)."""
        words, ready = self._words, self._ready
        return [(r, words[ready + r]) for r in range(self.rows) if r != self.row and words[ready + r]]

    # -- a router --------------------------------------------------------------------------------

    def mark_ready(self, port: int) -> None:
        """This router serves; `port`: its process's own 127.0.0.1 listener (for /metrics)."""
        if port <= 0:
            raise ValueError("a ready router gives the port of its own listener")
        self._words[self._ready + self.row] = port

    def write(self, worker_id: str, load: Load, all_loads: Callable[[], dict[str, Load]]) -> None:
        """Publish this router's `load` (FIELDS) on `worker_id`. `all_loads()` (every worker's, at
        this router) rewrites the row instead when the column table changed since the last call."""
        self._refresh()
        if self._row_generation != self._generation:
            self._rewrite(all_loads())
            return
        c = self._column(worker_id)
        if c is not None:
            # Word by word: a numpy item assignment took ~15 us on a cold cache, this ~6 us.
            words, at = self._words, self._base + (self.row * self.columns + c) * len(FIELDS)
            words[at], words[at + 1], words[at + 2] = load

    def others_requests(self, worker_ids: Sequence[str]) -> list[int]:
        """For each worker, the requests the other routers have on it (`others(...)[:, 0]`).

        Why not `others` for a few workers: the router calls this on every request, and between the
        requests of a light load numpy's caches go cold. Its four calls then took ~150 us where the
        same sums in Python over the shared words took ~20 us for two workers (57 us for 32). Past
        `_PYTHON_SUMS` workers numpy's vector sums win again."""
        if len(worker_ids) > _PYTHON_SUMS:
            return self.others(worker_ids)[:, 0].tolist()
        self._refresh()
        words, base, rows = self._words, self._base, self._other_rows
        fields = len(FIELDS)
        out = []
        for w in worker_ids:
            c = self._column(w)
            if c is None:
                out.append(0)
                continue
            at = base + c * fields
            out.append(sum(words[at + r] for r in rows))
        return out

    def others(self, worker_ids: Sequence[str]) -> np.ndarray:
        """For each worker, what the other routers have on it: an int64 array (workers x FIELDS)."""
        self._refresh()
        ids = tuple(worker_ids)
        found = self._gather.get(ids)
        if found is None:
            if len(self._gather) >= 16:  # membership churn: start over rather than grow
                self._gather.clear()
            known = [self._column(w) for w in ids]
            found = self._gather[ids] = (
                np.array([-1 if c is None else c for c in known], np.intp),
                np.array([c is None for c in known], bool),
            )
        cols, missing = found
        cells = self._cells[:, cols]
        total = cells.sum(axis=0) - cells[self.row]
        if missing.any():
            total[missing] = 0
        return total

    def _column(self, worker_id: str) -> int | None:
        try:
            return self._by_id[worker_id]
        except KeyError:
            c = self._by_id[worker_id] = self._columns.get(worker_key(worker_id))
            return c

    def _refresh(self) -> None:
        """Re-read the column table if the owner changed it."""
        generation = self._words[0]
        if generation == self._generation:
            return
        words, base = self._words, self._hashes
        self._columns = {words[base + c]: c for c in range(self.columns) if words[base + c]}
        self._by_id.clear()
        self._gather.clear()
        self._generation = generation

    def _rewrite(self, all_loads: dict[str, Load]) -> None:
        row = np.zeros((self.columns, len(FIELDS)), np.int64)
        for w, load in all_loads.items():
            c = self._column(w)
            if c is not None:
                row[c] = load
        self._cells[self.row] = row
        self._row_generation = self._generation

    @staticmethod
    def _check_row(row: int, rows: int) -> None:
        if not 0 <= row < rows:
            raise ValueError(f"row {row} is not on a board of {rows} rows")

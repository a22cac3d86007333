"""The load board several frontend processes share: each adds the others' loads to its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.router.load_board import SHM_DIR, LoadBoard


def requests(board: LoadBoard, workers: list[str]) -> list[int]:
    """The other routers' in-flight requests on each worker, as the router reads them; the same
    as the first column of `others`, which the KV router reads."""
    counts = board.others_requests(workers)
    assert counts == board.others(workers)[:, 0].tolist()
    return counts


def _board(rows: int = 3, columns: int = 8) -> tuple[LoadBoard, list[LoadBoard]]:
    """The owner (also row 0's router) and a router attached on each other row."""
    owner = LoadBoard.create(rows, columns)
    return owner, [LoadBoard.attach(owner.path, rows, columns, r) for r in range(1, rows)]


def test_each_router_sees_the_others_counts_not_its_own() -> None:
    owner, (one, two) = _board()
    owner.assign(["w0", "w1"])
    one.write("w0", (3, 0, 0), lambda: {"w0": (3, 0, 0)})
    two.write("w0", (1, 0, 0), lambda: {"w0": (1, 0, 0)})
    two.write("w1", (2, 0, 0), lambda: {"w0": (1, 0, 0), "w1": (2, 0, 0)})
    owner.write("w1", (5, 0, 0), lambda: {"w1": (5, 0, 0)})
    assert requests(owner, ["w0", "w1", "unknown"]) == [4, 2, 0]
    assert requests(one, ["w0", "w1"]) == [1, 7]
    assert requests(two, ["w0", "w1"]) == [3, 5]
    one.write("w0", (0, 0, 0), lambda: {})  # its requests on w0 finished
    assert requests(owner, ["w0"]) == [1]
    for b in (one, two, owner):
        b.close()


def test_a_worker_that_left_takes_its_column_and_counts_with_it() -> None:
    owner, [one] = _board(rows=2, columns=4)
    owner.assign(["w0", "w1"])
    one.write("w0", (3, 0, 0), lambda: {"w0": (3, 0, 0)})
    owner.assign(["w1", "w2"])  # w0 left, w2 joined: w2 must not inherit w0's 3
    assert requests(owner, ["w0", "w1", "w2"]) == [0, 0, 0]
    # The router still counts a request on w1 from before; its next write after the change
    # rewrites its whole row from its own counts.
    one.write("w2", (1, 0, 0), lambda: {"w1": (2, 0, 0), "w2": (1, 0, 0)})
    assert requests(owner, ["w1", "w2"]) == [2, 1]
    owner.close()
    one.close()


def test_a_freed_column_is_reused_last() -> None:
    owner, [one] = _board(rows=2, columns=3)
    owner.assign(["a", "b"])
    one.write("a", (4, 0, 0), lambda: {"a": (4, 0, 0)})
    owner.assign(["b"])  # a's column is free, but one has not rewritten its row yet
    owner.assign(["b", "c"])  # c takes the never-used column, not a's
    assert requests(owner, ["c"]) == [0]
    owner.assign(["b", "c", "d"])  # only a's column is left now
    one.write("d", (0, 0, 0), lambda: {})
    assert requests(owner, ["b", "c", "d"]) == [0, 0, 0]
    owner.close()
    one.close()


def test_a_registry_change_with_the_same_workers_changes_nothing() -> None:
    """Every worker's load report is a registry change: with the same workers (in any order) the
    board keeps its generation, so no router rewrites its row, and every column stays put."""
    owner, [one] = _board(rows=2, columns=4)
    owner.assign(["a", "b"])
    one.write("a", (2, 0, 0), lambda: {"a": (2, 0, 0)})
    generation = owner._words[0]
    for _ in range(3):
        owner.assign(["b", "a"])
    assert owner._words[0] == generation
    assert requests(owner, ["a", "b"]) == [2, 0]
    owner.assign(["a", "b", "c"])
    assert owner._words[0] == generation + 1
    owner.close()
    one.close()


def test_more_workers_than_columns_route_on_local_counts() -> None:
    owner, [one] = _board(rows=2, columns=2)
    owner.assign(["a", "b", "c"])
    one.write("a", (1, 0, 0), lambda: {"a": (1, 0, 0), "b": (1, 0, 0), "c": (1, 0, 0)})
    got = requests(owner, ["a", "b", "c"])
    assert sorted(got) == [0, 1, 1]  # two of them have columns; the third reads as 0
    owner.close()
    one.close()


def test_ready_routers_name_their_ports_and_a_stopped_one_is_cleared() -> None:
    owner, (one, two) = _board()
    owner.assign(["w0"])
    assert owner.ready_rows() == 0 and owner.peers() == []
    one.mark_ready(5001)  # the port of its process's own listener
    two.mark_ready(5002)
    assert owner.ready_rows() == 2
    assert owner.peers() == [(1, 5001), (2, 5002)] and one.peers() == [(2, 5002)]
    one.write("w0", (6, 0, 0), lambda: {"w0": (6, 0, 0)})
    owner.clear_row(1)
    assert requests(owner, ["w0"]) == [0] and owner.ready_rows() == 1 and owner.peers() == [(2, 5002)]
    with pytest.raises(ValueError, match="port"):
        one.mark_ready(0)
    with pytest.raises(ValueError, match="row 3"):
        owner.clear_row(3)
    for b in (one, two, owner):
        b.close()


def test_another_process_writes_through_the_path_and_nothing_is_left_in_dev_shm() -> None:
    before = {p.name for p in SHM_DIR.glob("tandem-load-*")}
    owner = LoadBoard.create(2, 16)
    assert {p.name for p in SHM_DIR.glob("tandem-load-*")} == before  # unlinked at once
    owner.assign(["w0"])
    code = (
        "import sys; from tandem.router.load_board import LoadBoard;"
        "b = LoadBoard.attach(sys.argv[1], 2, 16, 1); b.write('w0', (7, 1, 2), lambda: {'w0': (7, 1, 2)});"
        "b.mark_ready(5001); b.close()"
    )
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=str(repo))
    subprocess.run([sys.executable, "-c", code, owner.path], check=True, env=env, timeout=60)
    assert owner.others(["w0"]).tolist() == [[7, 1, 2]] and owner.ready_rows() == 1
    owner.close()


def test_rows_and_columns_are_checked() -> None:
    with pytest.raises(ValueError):
        LoadBoard.create(0, 8)
    owner = LoadBoard.create(2, 8)
    with pytest.raises(ValueError, match="row 2"):
        LoadBoard.attach(owner.path, 2, 8, 2)
    owner.close()


def test_kv_blocks_and_queued_prefill_tokens_travel_with_the_requests() -> None:
    owner, [one] = _board(rows=2, columns=4)
    owner.assign(["w0", "w1"])
    one.write("w0", (2, 30, 700), lambda: {"w0": (2, 30, 700)})
    one.write("w1", (1, 12, 0), lambda: {"w0": (2, 30, 700), "w1": (1, 12, 0)})
    assert owner.others(["w1", "w0", "gone"]).tolist() == [[1, 12, 0], [2, 30, 700], [0, 0, 0]]
    assert one.others(["w0", "w1"]).tolist() == [[0, 0, 0], [0, 0, 0]]
    owner.close()
    one.close()


@pytest.mark.parametrize("workers", [5, 31, 40])
def test_request_counts_of_many_workers_add_up_over_every_other_row(workers: int) -> None:
    # Up to 32 workers the counts are summed in Python, past that with numpy: both must agree.
    owner, routers = _board(rows=4, columns=64)
    ids = [f"w{i}" for i in range(workers)]
    owner.assign(ids)
    for r, router in enumerate(routers, start=1):
        loads = {w: (r * (i + 1), i, 0) for i, w in enumerate(ids)}
        for w in ids:
            router.write(w, loads[w], lambda loads=loads: loads)
    owner.write(ids[0], (100, 0, 0), lambda: {ids[0]: (100, 0, 0)})
    expected = [(1 + 2 + 3) * (i + 1) for i in range(workers)]
    assert requests(owner, [*ids, "gone"]) == [*expected, 0]
    # Router 1 sees rows 0, 2 and 3: the owner's 100 on w0, not its own counts.
    assert requests(routers[0], ids[:2]) == [100 + 5 * 1, 5 * 2]
    for b in (owner, *routers):
        b.close()

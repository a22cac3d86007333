"""Serving processes take their start-up heap out of the garbage collector's reach."""

from __future__ import annotations

import gc

from tandem.cli.worker import freeze_startup_heap


def test_freeze_startup_heap_moves_live_objects_out_of_collections() -> None:
    keep = [[i] for i in range(10_000)]  # what start-up allocated and keeps (modules, model, ...)
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(keep)
        # A full collection no longer walks them: only what was allocated since is left to look at.
        assert len(gc.get_objects()) < len(keep)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0

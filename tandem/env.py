"""Every environment variable Tandem reads, read here and nowhere else.

Each is a function rather than a module constant so tests can set the variable (monkeypatch.setenv)
after import and see it take effect.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """TANDEM_CACHE_DIR: where converted models and other downloads live (default ~/.cache/tandem)."""
    value = os.environ.get("TANDEM_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "tandem"


def models_dir() -> Path:
    """Converted checkpoints, one folder each, under the cache dir."""
    return cache_dir() / "models"


def torch_threads() -> int | None:
    """TANDEM_TORCH_THREADS: intra-op threads of the built-in engine on CPU (unset: the cores this
    process may run on, or OMP_NUM_THREADS if set). A positive integer."""
    value = os.environ.get("TANDEM_TORCH_THREADS")
    if not value:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"TANDEM_TORCH_THREADS must be a positive integer, got {value!r}")
    return n

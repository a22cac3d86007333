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

"""Fixtures of the router tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder as the simulated engine needs it: a config.json, no weights, no tokenizer."""
    d = tmp_path / "simmodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 2048, "vocab_size": 1000}))
    return d

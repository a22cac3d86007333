"""Fixtures of the router tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sim_model import sim_model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder as the simulated engine needs it: a config.json, no weights, no tokenizer."""
    return sim_model_dir(tmp_path)

"""A model folder for the simulated engine in tests."""

from __future__ import annotations

import json
from pathlib import Path


def sim_model_dir(parent: Path, context: int = 2048) -> Path:
    """`parent/simmodel` with the one file the simulated engine reads: a config.json with the
    context length and vocabulary size (no weights, no tokenizer)."""
    d = parent / "simmodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": context, "vocab_size": 1000}))
    return d

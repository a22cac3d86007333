from __future__ import annotations

from pathlib import Path

import pytest

from tandem.models.smollm2 import convert_smollm2


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as bf16 safetensors, converted once into the user cache (as the demo does)."""
    return convert_smollm2()

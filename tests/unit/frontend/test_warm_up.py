"""The frontend loads each served model's tokenizer at start-up, not on its first request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.frontend.app import create_app
from tandem.router.interface import ModelCard


class _Models:
    """Just enough of a Backend for start-up: the served models."""

    def __init__(self, *cards: ModelCard) -> None:
        self.cards = list(cards)

    def models(self) -> list[ModelCard]:
        return self.cards


async def test_warm_up_loads_tokenizers_and_survives_a_broken_model(tiny_dir: Path, tmp_path: Path) -> None:
    backend: Any = _Models(ModelCard("tiny", str(tiny_dir), 512), ModelCard("broken", str(tmp_path), 512))
    frontend = create_app(backend).state.frontend
    await frontend.warm_up()  # the broken folder (no tokenizer files) is logged, not raised
    assert set(frontend.tokenizers._loaded) == {str(tiny_dir)}

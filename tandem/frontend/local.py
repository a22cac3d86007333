"""LocalBackend: the `Backend` interface over an in-process AsyncEngine (tests, single-process serving).

No router, no request plane: `generate` streams straight from the engine thread. Closing the stream
early aborts the request in the engine and frees its KV blocks, as the Backend contract asks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engines.factory import build_executor
from tandem.protocol.errors import ModelNotFoundError
from tandem.protocol.messages import EngineOutput, GenerateRequest
from tandem.router.interface import ModelCard

log = logging.getLogger(__name__)


class LocalBackend:
    """Serves one model, named `name`, from `engine`; tokenizer files are read from `model_dir`."""

    def __init__(self, model_dir: str | Path, engine: AsyncEngine, name: str) -> None:
        self.engine = engine
        self.card = ModelCard(
            name=name,
            model_dir=str(model_dir),
            max_model_len=engine.core.max_model_len,
            created=int(time.time()),
        )

    @classmethod
    def build(
        cls,
        model_dir: str | Path,
        *,
        engine: str = "sim",
        name: str | None = None,
        config: EngineConfig | None = None,
        speedup: float = 1.0,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> LocalBackend:
        """Build the executor, core and engine thread for `model_dir` (engine "sim" or "builtin")."""
        config = config or EngineConfig()
        executor = build_executor(engine, model_dir, config, dtype=dtype, device=device, speedup=speedup)
        async_engine = AsyncEngine(EngineCore(config, executor), name=f"engine-{engine}")
        return cls(model_dir, async_engine, name or Path(model_dir).name)

    def models(self) -> list[ModelCard]:
        return [self.card]

    def is_ready(self, model: str) -> bool:
        return model == self.card.name and self.engine._thread.is_alive()

    def announce(self, model: str, request_id: str) -> None:
        """The request is on its way to the engine (see `RouterBackend.announce`)."""
        if model == self.card.name:
            self.engine.expect(request_id)

    def withdraw(self, request_id: str) -> None:
        """Nothing to undo: an announcement that is not followed goes stale in the engine."""

    def generate(self, req: GenerateRequest) -> AsyncIterator[EngineOutput]:
        if req.model != self.card.name:
            raise ModelNotFoundError(f"the model {req.model!r} is not served here")
        return self.engine.generate(req)

    def close(self) -> None:
        """Stop the engine thread (streams still open end with an error)."""
        self.engine.shutdown()

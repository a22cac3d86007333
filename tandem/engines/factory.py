"""Builds an executor by name: the one place that knows which engines exist."""

from __future__ import annotations

from pathlib import Path

from tandem.engine.config import EngineConfig
from tandem.engine.executor import Executor
from tandem.engines.sim.clock import Clock

ENGINES = ("builtin", "sim")


def build_executor(
    engine: str,
    model_dir: str | Path | None,
    config: EngineConfig,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    speedup: float = 1.0,
    clock: Clock | None = None,
) -> Executor:
    """`builtin`: the PyTorch engine on `model_dir`'s weights. `sim`: the timing-model engine (needs
    only config.json from `model_dir`, or nothing)."""
    if engine == "builtin":
        from tandem.engines.builtin.executor import BuiltinExecutor

        if model_dir is None:
            raise ValueError("the builtin engine needs a model folder")
        return BuiltinExecutor(model_dir, config, dtype=dtype, device=device)
    if engine == "sim":
        from tandem.engines.sim.executor import SimExecutor

        return SimExecutor(model_dir, config, speedup=speedup, clock=clock)
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")

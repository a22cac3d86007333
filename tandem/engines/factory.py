"""Builds an executor by name: the one place that knows which engines exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    kv_connector: Any = None,
) -> Executor:
    """`builtin`: the PyTorch engine on `model_dir`'s weights. `sim`: the timing-model engine (needs
    only config.json from `model_dir`, or nothing). `kv_connector` (the worker side of a KV
    connector) is handed the executor's KV cache; the simulated engine has none to hand over."""
    if engine == "builtin":
        from tandem.engines.builtin.executor import BuiltinExecutor

        if model_dir is None:
            raise ValueError("the builtin engine needs a model folder")
        return BuiltinExecutor(
            model_dir, config, dtype=dtype, device=device, kv_connector_worker=kv_connector
        )
    if engine == "sim":
        from tandem.engines.sim.executor import SimExecutor

        sim = SimExecutor(model_dir, config, speedup=speedup, clock=clock)
        if kv_connector is not None and hasattr(kv_connector, "register_kv_caches"):
            kv_connector.register_kv_caches(None)
        return sim
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")

"""Which dtype the built-in engine computes in on CPUs with and without half-precision arithmetic."""

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engines.builtin import dtypes
from tandem.engines.builtin.executor import BuiltinExecutor


def test_float32_is_kept_everywhere() -> None:
    assert dtypes.compute_dtype("float32", "cpu") == "float32"


def test_cpu_with_bf16_arithmetic_keeps_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtypes, "cpu_has_arithmetic", lambda d: True)
    assert dtypes.compute_dtype("bfloat16", "cpu") == "bfloat16"


def test_cpu_without_bf16_arithmetic_computes_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtypes, "cpu_has_arithmetic", lambda d: False)
    assert dtypes.compute_dtype("bfloat16", "cpu") == "float32"
    assert dtypes.compute_dtype("float16", torch.device("cpu")) == "float32"
    monkeypatch.setenv("TANDEM_CPU_HALF", "native")
    assert dtypes.compute_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setenv("TANDEM_CPU_HALF", "fast")
    with pytest.raises(ValueError, match="TANDEM_CPU_HALF"):
        dtypes.compute_dtype("bfloat16", "cpu")


def test_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtypes.compute_dtype("int8", "cpu")


def test_executor_reports_what_it_runs_in(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtypes, "cpu_has_arithmetic", lambda d: False)
    ex = BuiltinExecutor(tiny_llama, EngineConfig(num_blocks=8), dtype="bfloat16")
    assert ex.dtype == torch.float32 and ex.kv_cache.dtype == torch.float32
    assert ex.model.embed.dtype == torch.float32
    monkeypatch.setattr(dtypes, "cpu_has_arithmetic", lambda d: True)
    ex = BuiltinExecutor(tiny_llama, EngineConfig(num_blocks=8), dtype="bfloat16")
    assert ex.dtype == torch.bfloat16 and ex.kv_cache.dtype == torch.bfloat16

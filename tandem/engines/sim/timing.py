"""Timing models for the simulated engine: how long one step takes, given what it computes.

The default is NVIDIA Dynamo's mocker model (lib/mocker), so simulated results compare with Dynamo:

    prefill_ms(T) = 4.209989e-7 * T^2 + 1.518344e-2 * T + 16.50142      T = new prefill tokens in the step
    decode_ms(u)  = max(1, -25.74 * u^2 + 54.01 * u + 5.74)              u = used KV blocks / total blocks
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepShape:
    """What a step computes, in the terms a timing model needs."""

    prefill_tokens: int
    """New tokens of requests that are still in their prompt (or recomputing after preemption)."""
    num_decodes: int
    """Requests that compute one token after their prompt."""
    kv_usage: float
    """Used KV blocks / total blocks, after allocation for this step."""


class TimingModel(Protocol):
    def step_ms(self, shape: StepShape) -> float: ...


@dataclass(frozen=True)
class PolynomialTiming:
    """Quadratic prefill cost in new tokens plus quadratic decode cost in KV usage (Dynamo's mocker)."""

    prefill: tuple[float, float, float] = (4.209989e-7, 1.518344e-2, 16.50142)
    decode: tuple[float, float, float] = (-25.74, 54.01, 5.74)
    min_decode_ms: float = 1.0

    def prefill_ms(self, tokens: int) -> float:
        a, b, c = self.prefill
        return a * tokens * tokens + b * tokens + c

    def decode_ms(self, usage: float) -> float:
        a, b, c = self.decode
        return max(self.min_decode_ms, a * usage * usage + b * usage + c)

    def step_ms(self, shape: StepShape) -> float:
        ms = 0.0
        if shape.prefill_tokens:
            ms += self.prefill_ms(shape.prefill_tokens)
        if shape.num_decodes:
            ms += self.decode_ms(shape.kv_usage)
        return ms

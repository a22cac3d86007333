"""Timing models for the simulated engine: how long one step (forward pass) takes.

A step's duration is the sum of a prefill part and a decode part, the way NVIDIA Dynamo 1.6.1's mocker
(`lib/mocker`, vLLM-style scheduler core) times a pass, checked against its offline replay:

    step_ms = prefill_ms(T)         if T > 0      T = uncached prompt tokens computed in the step,
                                                  summed over every request (one batched prefill)
            + decode_ms(B, u)       if B > 0      B = requests that were already decoding (all known
                                                  tokens computed before the step); a request whose
                                                  prompt finishes in this step gets its first token
                                                  from the prefill part and adds no decode time
    u = min(1, sum of the B requests' context lengths / (num_blocks * block_size))

`u` counts *logical* tokens of the decoding batch (prompt + generated so far, shared prefixes counted
once per request), not physically used blocks, and excludes requests still in prefill. Both parts are
divided by the executor's speed-up. Dynamo's polynomials (ms):

    prefill_ms(T) = 4.209989e-7 * T^2 + 1.518344e-2 * T + 16.50142
    decode_ms(u)  = max(1, -25.74 * u^2 + 54.01 * u + 5.74)

`ProfileTiming` replaces the polynomials with a measured table (a real engine's profile), linearly
interpolated, so the simulator can stand in for that engine.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step computes, in the terms a timing model needs."""

    prefill_tokens: int
    """New (uncached) tokens of requests still in their prompt, or recomputing after preemption."""
    num_decodes: int
    """Requests that compute one token after their prompt (B)."""
    kv_usage: float
    """Used KV blocks / total blocks after this step's allocations (physical usage)."""
    decode_kv_tokens: int = 0
    """Sum of the decoding requests' context lengths (logical KV tokens the decode reads)."""
    kv_capacity_tokens: int = 0
    """num_blocks * block_size; 0 when unknown, and `decode_usage` then falls back to `kv_usage`."""
    num_prefills: int = 0
    """Requests contributing prefill tokens (k)."""
    prefill_start_tokens: int = 0
    """Sum of those requests' computed tokens before the step (prefix hits and earlier chunks)."""
    prefill_attn_pairs: int = 0
    """Causal (query, key) pairs the prefill part attends over: for each prefill request with `n`
    new tokens after `s` computed ones, n*s + n*(n+1)/2. 0 when the caller does not count them;
    attention-aware models then treat the step as one request (see `RooflineTiming`)."""

    @property
    def dynamo_prefill_tokens(self) -> int:
        """T as Dynamo's mocker counts it: k * (mean end - mean start) with integer means, which
        undercounts the true sum by less than k tokens (under 0.02 ms a step)."""
        k = self.num_prefills
        if k <= 1:
            return self.prefill_tokens
        s = self.prefill_start_tokens
        return k * ((s + self.prefill_tokens) // k - s // k)

    @property
    def decode_usage(self) -> float:
        """u: the decode batch's logical KV tokens over the cache's capacity, at most 1."""
        if self.kv_capacity_tokens <= 0:
            return self.kv_usage
        return min(1.0, self.decode_kv_tokens / self.kv_capacity_tokens)


class TimingModel(Protocol):
    def step_ms(self, shape: StepShape) -> float:
        """Duration of one step in milliseconds at speed-up 1."""
        ...


@dataclass(frozen=True)
class PolynomialTiming:
    """Quadratic prefill cost in new tokens plus quadratic decode cost in u (Dynamo's mocker)."""

    prefill: tuple[float, float, float] = (4.209989e-7, 1.518344e-2, 16.50142)
    """(a, b, c) of a*T^2 + b*T + c."""
    decode: tuple[float, float, float] = (-25.74, 54.01, 5.74)
    """(a, b, c) of a*u^2 + b*u + c."""
    min_decode_ms: float = 1.0
    """Floor on a decode part, so token-emitting steps never take zero time."""
    integer_mean_batching: bool = True
    """Count T as Dynamo does (`StepShape.dynamo_prefill_tokens`), so replays match its to the
    microsecond; False uses the exact sum."""

    def prefill_ms(self, tokens: int) -> float:
        a, b, c = self.prefill
        return a * tokens * tokens + b * tokens + c

    def decode_ms(self, usage: float) -> float:
        a, b, c = self.decode
        return max(self.min_decode_ms, a * usage * usage + b * usage + c)

    def step_ms(self, shape: StepShape) -> float:
        ms = 0.0
        if shape.prefill_tokens:
            t = shape.dynamo_prefill_tokens if self.integer_mean_batching else shape.prefill_tokens
            ms += self.prefill_ms(t)
        if shape.num_decodes:
            ms += self.decode_ms(shape.decode_usage)
        return ms


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, *, extrapolate: bool) -> float:
    """Piecewise-linear y(x) through sorted points; beyond the ends extend the end segment or clamp."""
    if len(xs) == 1:
        return ys[0]
    i = bisect.bisect_right(xs, x)
    if i == 0 or i == len(xs):
        if not extrapolate:
            return ys[0] if i == 0 else ys[-1]
        i = 1 if i == 0 else len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _sorted_axis(name: str, values: Any) -> list[float]:
    axis = [float(v) for v in values]
    if not axis:
        raise ValueError(f"profile axis {name!r} is empty")
    if any(b <= a for a, b in itertools.pairwise(axis)):
        raise ValueError(f"profile axis {name!r} must be strictly increasing")
    return axis


@dataclass(frozen=True)
class ProfileTiming:
    """Step time from a measured profile, combined as the polynomial model combines its parts.

    Prefill: ms per batched new-token count, linear between points and extended linearly past the
    ends (long prompts outrun most profiles). Decode: ms per batch size B, optionally also per
    u (`decode_usage`): bilinear inside the grid, clamped at its edges.
    """

    prefill_tokens: tuple[float, ...]
    prefill_ms_points: tuple[float, ...]
    decode_batch: tuple[float, ...]
    decode_usage_axis: tuple[float, ...] | None
    """None: decode ms depends on batch size only, and `decode_ms_grid` has one row."""
    decode_ms_grid: tuple[tuple[float, ...], ...]
    """Row per usage point (or one row), column per batch size."""
    min_decode_ms: float = 1.0

    @classmethod
    def from_json(cls, path: str | Path) -> ProfileTiming:
        """Load a profile file::

            {"prefill": {"tokens": [128, 1024, 8192], "ms": [9.0, 25.0, 160.0]},
             "decode":  {"batch_size": [1, 64, 256], "ms": [6.0, 9.0, 20.0]}}

        or, with KV usage as a second decode axis, ``"decode": {"batch_size": [...],
        "kv_usage": [0.0, 0.5, 1.0], "ms": [[...per batch size...] per usage]}``.
        """
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileTiming:
        pre, dec = data["prefill"], data["decode"]
        tokens = _sorted_axis("prefill.tokens", pre["tokens"])
        pre_ms = [float(v) for v in pre["ms"]]
        if len(pre_ms) != len(tokens):
            raise ValueError("prefill.ms needs one value per prefill.tokens point")
        batch = _sorted_axis("decode.batch_size", dec["batch_size"])
        usage = _sorted_axis("decode.kv_usage", dec["kv_usage"]) if "kv_usage" in dec else None
        rows = dec["ms"] if usage is not None else [dec["ms"]]
        grid = tuple(tuple(float(v) for v in row) for row in rows)
        if len(grid) != (len(usage) if usage is not None else 1) or any(len(r) != len(batch) for r in grid):
            raise ValueError("decode.ms must have one row per kv_usage point, one value per batch size")
        return cls(tuple(tokens), tuple(pre_ms), tuple(batch), tuple(usage) if usage else None, grid)

    def prefill_ms(self, tokens: int) -> float:
        return max(0.0, _interp(self.prefill_tokens, self.prefill_ms_points, tokens, extrapolate=True))

    def decode_ms(self, batch: int, usage: float) -> float:
        per_row = [_interp(self.decode_batch, row, batch, extrapolate=False) for row in self.decode_ms_grid]
        if self.decode_usage_axis is None:
            ms = per_row[0]
        else:
            ms = _interp(self.decode_usage_axis, per_row, usage, extrapolate=False)
        return max(self.min_decode_ms, ms)

    def step_ms(self, shape: StepShape) -> float:
        ms = 0.0
        if shape.prefill_tokens:
            ms += self.prefill_ms(shape.prefill_tokens)
        if shape.num_decodes:
            ms += self.decode_ms(shape.num_decodes, shape.decode_usage)
        return ms

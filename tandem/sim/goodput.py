"""Goodput (DistServe): the highest request rate at which enough requests meet both latency SLOs.

A request meets the SLO when it finished, its TTFT (arrival -> first token delivered) is at most
`ttft_s` and its TPOT ((last token - first token) / (tokens - 1); one-token requests pass) is at most
`tpot_s`. A rate is *good* when at least `attainment` of all requests meet it. `find_goodput` searches
Poisson rates: it grows (or shrinks) the rate by a factor until it brackets the boundary, then
bisects the bracket to a relative tolerance, and returns the highest good rate it ran.

Workloads use common random numbers: `PoissonWorkload(lengths, n, seed)(rate)` draws the same
request lengths and the same unit-rate exponential gaps for every rate (only scaled by 1/rate), so
attainment changes with the rate alone and two configurations see identical requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.traces import TokenSpace, TraceRequest, load_azure
from tandem.sim.metrics import RequestRecord, RunMetrics


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.050
    attainment: float = 0.9
    """Fraction of requests that must meet both targets."""


def tpot_s(rec: RequestRecord) -> float:
    """Mean gap between a request's tokens after the first; 0 for one-token requests."""
    if rec.num_tokens <= 1:
        return 0.0
    return (rec.last_token - rec.first_token) / (rec.num_tokens - 1)


def meets(rec: RequestRecord, slo: Slo) -> bool:
    return rec.finished and rec.first_token - rec.arrival <= slo.ttft_s and tpot_s(rec) <= slo.tpot_s


def attainment(metrics: RunMetrics, slo: Slo) -> float:
    """Fraction of all requests (unfinished and rejected ones fail) that meet the SLO."""
    recs = metrics.records
    return sum(meets(r, slo) for r in recs) / len(recs) if recs else 0.0


def latency_summary(metrics: RunMetrics) -> dict[str, float]:
    """TTFT and TPOT p50/p90 and ITL p50/p99, in ms."""
    done = [r for r in metrics.records if r.finished]
    if not done:
        return {}
    ttft = np.array([r.first_token - r.arrival for r in done]) * 1e3
    tpot = np.array([tpot_s(r) for r in done if r.num_tokens > 1] or [0.0]) * 1e3
    itl = np.frombuffer(metrics.itl_gaps, dtype=np.float64) * 1e3 if len(metrics.itl_gaps) else np.zeros(1)
    return {
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p90_ms": float(np.percentile(ttft, 90)),
        "tpot_p50_ms": float(np.percentile(tpot, 50)),
        "tpot_p90_ms": float(np.percentile(tpot, 90)),
        "itl_p50_ms": float(np.percentile(itl, 50)),
        "itl_p99_ms": float(np.percentile(itl, 99)),
    }


def azure_lengths(path: str | Path | None = None) -> list[tuple[int, int]]:
    """(prompt, output) token lengths of every row of the Azure conversation trace."""
    return [(r.input_len, r.output_len) for r in load_azure(path)]


def uniform_lengths(
    isl: tuple[int, int], osl: tuple[int, int], n: int = 4096, seed: int = 0
) -> list[tuple[int, int]]:
    """`n` (prompt, output) pairs, each uniform on its closed range."""
    rng = np.random.default_rng(seed)
    a = rng.integers(isl[0], isl[1] + 1, n)
    b = rng.integers(osl[0], osl[1] + 1, n)
    return list(zip(a.tolist(), b.tolist(), strict=True))


@dataclass(frozen=True)
class PoissonWorkload:
    """`num_requests` Poisson arrivals with lengths drawn (with replacement) from `lengths`."""

    lengths: Sequence[tuple[int, int]]
    num_requests: int
    seed: int = 0
    space: TokenSpace = field(default_factory=lambda: TokenSpace(block_size=16))

    def __call__(self, rate: float) -> list[TraceRequest]:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        rng = np.random.default_rng(self.seed)
        gaps = rng.exponential(1.0, self.num_requests)
        picks = rng.integers(0, len(self.lengths), self.num_requests)
        arrivals = np.cumsum(gaps) / rate
        return [
            TraceRequest(float(t), *self.lengths[int(k)], index=j, space=self.space)
            for j, (t, k) in enumerate(zip(arrivals, picks, strict=True))
        ]


@dataclass
class GoodputResult:
    rate: float
    """Highest rate run that met the SLO (0.0 if none did)."""
    metrics: RunMetrics | None
    """The run at `rate`."""
    probes: list[tuple[float, float]] = field(default_factory=list)
    """(rate, attainment) of every run, in order."""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"goodput": self.rate, "probes": self.probes}
        if self.metrics is not None:
            out.update(latency_summary(self.metrics))
        return out


def find_goodput(
    run: Callable[[float], RunMetrics],
    slo: Slo,
    start_rate: float,
    *,
    growth: float = 1.5,
    rel_tol: float = 0.03,
    min_rate: float = 1e-3,
) -> GoodputResult:
    """Search rates with `run(rate)` (see module docstring). Attainment need not be perfectly
    monotone in the rate: the answer is the highest good rate below the lowest bad one bracketed."""
    if start_rate <= 0 or growth <= 1 or rel_tol <= 0:
        raise ValueError("need start_rate > 0, growth > 1, rel_tol > 0")
    result = GoodputResult(0.0, None)

    def good(rate: float) -> bool:
        m = run(rate)
        a = attainment(m, slo)
        result.probes.append((rate, a))
        if a >= slo.attainment and rate > result.rate:
            result.rate, result.metrics = rate, m
        return a >= slo.attainment

    lo, hi = 0.0, math.inf
    rate = start_rate
    while hi == math.inf or lo == 0.0:
        if good(rate):
            lo = rate
            if hi != math.inf:
                break
            rate *= growth
        else:
            hi = rate
            if lo > 0.0:
                break
            rate /= growth
            if rate < min_rate:
                return result
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if good(mid):
            lo = mid
        else:
            hi = mid
    return result

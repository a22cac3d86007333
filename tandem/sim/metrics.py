"""Per-request records of a simulated run, and the summary a benchmark prints.

Definitions (as in the mission brief and Dynamo's replay report):
- TTFT = first token time - arrival; E2E = last token time - arrival.
- ITL percentiles are over every gap between consecutive tokens of every request (so a decode step
  slowed by a long prefill chunk shows in the tail); `itl_mean` is their mean.
- TPOT is per request: (last token - first token) / (tokens - 1), the "ITL" of the referee client
  and Dynamo's `tpot`; its percentiles are over requests with two tokens or more.
- hit rate = cached prompt tokens / prompt tokens, cached tokens counted at a request's first
  admission (a recompute after preemption does not count again).
"""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds on the simulation clock."""

    arrival: float
    prompt_tokens: int
    engine: int = -1
    first_token: float = -1.0
    last_token: float = -1.0
    num_tokens: int = 0
    cached_tokens: int = 0
    finished: bool = False


@dataclass
class RunMetrics:
    """Collects records and token gaps while a simulation runs; `summary()` reduces them."""

    records: list[RequestRecord] = field(default_factory=list)
    itl_gaps: array = field(default_factory=lambda: array("d"))
    """Seconds between consecutive tokens, all requests together."""
    wall_s: float = 0.0
    """Real seconds the simulation took."""
    num_steps: int = 0
    router_waited: int = 0
    """Requests that found every worker busy and waited in the router's queue."""
    router_shed: int = 0
    """Requests refused at once: every worker busy and the router's queue full (or none)."""
    router_timeouts: int = 0
    """Requests refused after waiting the router's queue timeout."""

    def on_tokens(self, rec: RequestRecord, t: float, n: int, cached: int, finished: bool) -> None:
        """Record `n` tokens of `rec` that became visible at time `t`."""
        if rec.num_tokens == 0:
            rec.first_token = t
            rec.cached_tokens = cached
        else:
            self.itl_gaps.append(t - rec.last_token)
        rec.last_token = t
        rec.num_tokens += n
        if finished:
            rec.finished = True

    def summary(self) -> dict[str, Any]:
        """Percentiles in milliseconds, hit rate in [0, 1], throughput per simulated second."""
        done = [r for r in self.records if r.finished]
        out: dict[str, Any] = {
            "num_requests": len(self.records),
            "completed": len(done),
            "wall_s": self.wall_s,
            "num_steps": self.num_steps,
            "router_waited": self.router_waited,
            "router_shed": self.router_shed,
            "router_timeouts": self.router_timeouts,
        }
        if not done:
            return out
        ttft = np.array([r.first_token - r.arrival for r in done]) * 1000.0
        e2e = np.array([r.last_token - r.arrival for r in done]) * 1000.0
        itl = np.frombuffer(self.itl_gaps, dtype=np.float64) * 1000.0 if len(self.itl_gaps) else np.zeros(1)
        prompt = sum(r.prompt_tokens for r in done)
        cached = sum(r.cached_tokens for r in done)
        out_tokens = sum(r.num_tokens for r in done)
        start = min(r.arrival for r in done)
        duration = max(r.last_token for r in done) - start
        out.update(
            hit_rate=cached / prompt if prompt else 0.0,
            prompt_tokens=prompt,
            cached_tokens=cached,
            output_tokens=out_tokens,
            duration_s=duration,
            request_throughput=len(done) / duration if duration > 0 else 0.0,
            output_throughput=out_tokens / duration if duration > 0 else 0.0,
            itl_mean_ms=float(itl.mean()),
        )
        tpot = np.array(
            [(r.last_token - r.first_token) / (r.num_tokens - 1) for r in done if r.num_tokens > 1] or [0.0]
        )
        for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot * 1000.0), ("e2e", e2e)):
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            out[f"{name}_p50_ms"] = float(p50)
            out[f"{name}_p90_ms"] = float(p90)
            out[f"{name}_p99_ms"] = float(p99)
        return out

    def per_request(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]

"""Benchmark metrics from per-request timings: percentiles, TTFT / ITL / TPOT / E2E, throughput, goodput.

Definitions (MISSION.md "Terms"; the same as vLLM's and AIPerf's benchmark clients):

    request:  sent ......... first token ... token ... token ... last token ... done
              t_start        t_first                            t_last          t_end
    TTFT = t_first - t_start        E2E = t_end - t_start
    ITL  = each gap between consecutive token chunks (pooled over all requests)
    TPOT = (t_last - t_first) / (output tokens - 1)   per request (requests with >= 2 tokens)

Throughput is over the measured window (first request sent -> last request done). Goodput follows
DistServe: a request is *good* when TTFT <= the TTFT SLO and TPOT <= the TPOT SLO (a one-token
request has no TPOT and is judged on TTFT); goodput = good requests / window, and the run attains
the SLO when at least `attainment` (90%) of its requests are good. Failed requests are never good.

Pure functions only: `summarize` takes the timings and returns a plain dict (the JSON report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request (times from `time.perf_counter()`, seconds)."""

    t_start: float
    t_end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    """Arrival time of each SSE event that carried output (one token each, normally)."""
    output_tokens: int = 0
    """The server's `usage.completion_tokens` when sent, else the number of output events."""
    prompt_tokens: int = 0
    error: str | None = None
    server: dict[str, float] | None = None
    """The server's own timing of the request, when asked for and sent (`LoadConfig.server_timing`):
    `ttft_ms`, `prefill_wait_time_ms`, `prefill_time_ms`, ... on the server's clock."""
    sent_unix_ms: float = 0.0
    """With `server`: the Unix time the client sent it (to compare with the server's
    `request_received_ms` when both run on one machine)."""

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.t_start

    @property
    def e2e(self) -> float:
        return self.t_end - self.t_start

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None with fewer than 2 tokens."""
        n = self.output_tokens
        if n < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (n - 1)


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.050
    attainment: float = 0.90
    """Fraction of requests that must be good for the run to meet the SLO."""

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or not 0 < self.attainment <= 1:
            raise ValueError("SLOs must be > 0 and attainment in (0, 1]")

    def good(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft > self.ttft_s:
            return False
        tpot = r.tpot
        return tpot is None or tpot <= self.tpot_s


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _dist_ms(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        v = percentile(values, p)
        out[f"p{p}"] = None if v is None else round(v * 1e3, 3)
    out["mean"] = round(sum(values) / len(values) * 1e3, 3) if values else None
    return out


def summarize(records: Sequence[RequestRecord], slo: Slo = Slo()) -> dict[str, Any]:
    """The report for one run (see the module docstring for every definition)."""
    ok = [r for r in records if r.ok]
    errors = [r.error or "no output" for r in records if not r.ok]
    if records:
        window = max(r.t_end for r in records) - min(r.t_start for r in records)
    else:
        window = 0.0
    per_s = 1.0 / window if window > 0 else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = sum(1 for r in records if slo.good(r))
    n = len(records)
    return {
        "requests": n,
        "completed": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": round(window, 3),
        "req_per_s": round(len(ok) * per_s, 2),
        "output_tok_per_s": round(out_tokens * per_s, 1),
        "output_tokens_mean": round(out_tokens / len(ok), 2) if ok else None,
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "chunks_per_request_mean": round(sum(len(r.chunk_times) for r in ok) / len(ok), 2) if ok else None,
        "ttft_ms": _dist_ms([r.ttft for r in ok]),
        "itl_ms": _dist_ms(gaps),
        "tpot_ms": _dist_ms(tpots),
        "e2e_ms": _dist_ms([r.e2e for r in ok]),
        "slo": {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3, "attainment": slo.attainment},
        "good_requests": good,
        "goodput_fraction": round(good / n, 4) if n else None,
        "goodput_req_per_s": round(good * per_s, 2),
        "slo_met": bool(n) and good / n >= slo.attainment,
        "server": _server_split(ok),
    }


def _server_split(ok: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """The client's TTFT split by the server's timing of the same requests: `outside_ms`, the
    client's TTFT minus the server's (HTTP both ways, the client's own delays); `intake_ms`, the
    server's receipt to its dispatch to a worker; `dispatch_to_first_ms`, from there to the first
    token back in the server, and of it (Tandem only) `engine_ms`, the engine's own time, and
    `plane_ms`, the rest. None when no request carried a timing."""
    timed = [r for r in ok if r.server is not None and "ttft_ms" in r.server]
    if not timed:
        return None

    def seconds(key: str) -> list[float]:
        return [float(r.server[key]) / 1e3 for r in timed if r.server is not None and key in r.server]

    # On one machine the clocks agree: the request's way in is the server's receipt minus the send.
    # Servers report whole milliseconds (truncated), so one request's figure is 0-1 ms short; a mean
    # over many requests is 0.5 ms short, for every server alike.
    way_in = [
        (float(r.server["request_received_ms"]) - r.sent_unix_ms) / 1e3
        for r in timed
        if r.server is not None and "request_received_ms" in r.server and r.sent_unix_ms
    ]
    return {
        "requests": len(timed),
        "ttft_ms": _dist_ms(seconds("ttft_ms")),
        "outside_ms": _dist_ms([r.ttft - float(r.server["ttft_ms"]) / 1e3 for r in timed if r.server]),
        "way_in_ms": _dist_ms(way_in),
        "intake_ms": _dist_ms(seconds("prefill_wait_time_ms")),
        "dispatch_to_first_ms": _dist_ms(seconds("prefill_time_ms")),
        # Tandem's `engine_ttft_ms`: the engine's share of dispatch-to-first-token, the rest is the
        # request plane's (both ways).
        "engine_ms": _dist_ms(seconds("engine_ttft_ms")),
        "plane_ms": _dist_ms(
            [
                (float(r.server["prefill_time_ms"]) - float(r.server["engine_ttft_ms"])) / 1e3
                for r in timed
                if r.server is not None and "engine_ttft_ms" in r.server and "prefill_time_ms" in r.server
            ]
        ),
    }


def format_table(report: dict[str, Any], title: str = "") -> str:
    """A fixed-width text table of a `summarize` report."""
    lines = [title] if title else []
    lines.append(
        f"requests {report['completed']}/{report['requests']} ok, {report['errors']} errors, "
        f"{report['duration_s']:.2f} s, {report['chunks_per_request_mean']} chunks/request"
    )
    lines.append(f"throughput {report['req_per_s']:.2f} req/s, {report['output_tok_per_s']:.1f} output tok/s")
    lines.append(f"{'metric (ms)':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
        d = report[key]
        cells = "".join(
            f"{'-' if d[k] is None else f'{d[k]:.2f}':>10}" for k in ("p50", "p90", "p99", "mean")
        )
        lines.append(f"{name:<12}{cells}")
    s = report["slo"]
    lines.append(
        f"goodput (TTFT <= {s['ttft_ms']:.0f} ms, TPOT <= {s['tpot_ms']:.0f} ms): "
        f"{report['goodput_req_per_s']:.2f} req/s, {100 * (report['goodput_fraction'] or 0):.1f}% of "
        f"requests good -> SLO {'met' if report['slo_met'] else 'missed'} "
        f"(needs {100 * s['attainment']:.0f}%)"
    )
    server = report.get("server")
    if server:
        lines.append(f"TTFT split by the server's own timing of {server['requests']} requests:")
        for key, name in (
            ("ttft_ms", "server TTFT"),
            ("outside_ms", "outside"),
            ("way_in_ms", " of it in"),
            ("intake_ms", "intake"),
            ("dispatch_to_first_ms", "->1st token"),
            ("engine_ms", " of it engine"),
            ("plane_ms", " of it plane"),
        ):
            d = server[key]
            if d["mean"] is None:
                continue
            cells = "".join(
                f"{'-' if d[k] is None else f'{d[k]:.2f}':>10}" for k in ("p50", "p90", "p99", "mean")
            )
            lines.append(f"{name:<12}{cells}")
    if report["first_error"]:
        lines.append(f"first error: {report['first_error']}")
    return "\n".join(lines)

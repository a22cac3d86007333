"""The engines' share of a run's latency, read from a Tandem frontend's /metrics before and after it.

    before = await scrape(session, url)        # after the warmup
    ...run...
    after = await scrape(session, url)
    share = engine_share(before, after, report)  # None unless the server exports tandem_worker_*

A Tandem frontend exports every worker's engine phases (`tandem.router.worker_metrics`): queue (request
handed to the engine -> its first step), prefill (-> its first token) and the gaps between later
tokens, as histograms on each engine's clock. Their means over the run, subtracted from the client's
means, are what the serving path added: client socket, HTTP, template, tokenizer, router, request
plane, both ways. With no other client on the server, the before/after difference is exactly the
measured requests (the warmup has ended before the first scrape, every request before the second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PHASES = {
    "queue": "tandem_worker_request_queue_seconds",
    "prefill": "tandem_worker_request_prefill_seconds",
    "itl": "tandem_worker_inter_token_latency_seconds",
}


@dataclass(frozen=True)
class EngineTotals:
    """Each phase's (sum of seconds, count), summed over the workers."""

    totals: dict[str, tuple[float, float]]


def parse(body: str) -> EngineTotals | None:
    """The phases' totals from a /metrics body; None when it has no worker phases (not Tandem's, or
    no worker answered)."""
    by_name = {name: phase for phase, name in PHASES.items()}
    sums: dict[str, list[float]] = {phase: [0.0, 0.0] for phase in PHASES}
    seen = False
    for family in text_string_to_metric_families(body):
        phase = by_name.get(family.name)
        if phase is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                sums[phase][0] += sample.value
                seen = True
            elif sample.name.endswith("_count"):
                sums[phase][1] += sample.value
    return EngineTotals({p: (s, c) for p, (s, c) in sums.items()}) if seen else None


async def scrape(session: Any, url: str) -> EngineTotals | None:
    """GET the server's /metrics (an aiohttp session); None if that fails or has no worker phases."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        async with session.get(f"{base}/metrics") as resp:
            if resp.status != 200:
                return None
            return parse(await resp.text())
    except Exception:  # a server without /metrics, or gone: the report just has no engine share
        return None


def engine_share(
    before: EngineTotals | None, after: EngineTotals | None, report: dict[str, Any]
) -> dict[str, Any] | None:
    """Engine means over the run (ms) and what the serving path added to the client's means."""
    if before is None or after is None:
        return None
    means: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for phase in PHASES:
        (s0, c0), (s1, c1) = before.totals[phase], after.totals[phase]
        n = c1 - c0
        counts[phase] = int(n)
        means[phase] = round((s1 - s0) / n * 1e3, 3) if n > 0 else None
    queue, prefill, itl = means["queue"], means["prefill"], means["itl"]
    ttft = round(queue + prefill, 3) if queue is not None and prefill is not None else None
    client_ttft, client_itl = report["ttft_ms"]["mean"], report["itl_ms"]["mean"]
    return {
        "queue_ms": queue,
        "prefill_ms": prefill,
        "ttft_ms": ttft,
        "itl_ms": itl,
        "counts": counts,
        "added_ttft_ms": _minus(client_ttft, ttft),
        "added_itl_ms": _minus(client_itl, itl),
    }


def format_share(share: dict[str, Any]) -> str:
    def ms(v: float | None, sign: bool = False) -> str:
        return "-" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")

    return (
        f"engines (server /metrics, means): queue {ms(share['queue_ms'])} + prefill "
        f"{ms(share['prefill_ms'])} = TTFT {ms(share['ttft_ms'])} ms, ITL {ms(share['itl_ms'])} ms over "
        f"{share['counts']['prefill']} requests\n"
        f"added by the serving path (client mean - engine mean): TTFT {ms(share['added_ttft_ms'], True)} ms, "
        f"ITL {ms(share['added_itl_ms'], True)} ms"
    )


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)

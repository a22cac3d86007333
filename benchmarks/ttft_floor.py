"""The lowest TTFT any router can give the Mooncake trace on Dynamo's replay settings.

    .venv/bin/python benchmarks/ttft_floor.py

A request's TTFT is at least its own prefill alone on an idle worker: its uncached tokens in chunks
of `--batched-tokens` (the engine's max batched tokens, one chunk per step), each chunk timed by the
simulated engine's polynomial (Dynamo's mocker). Anything else on the worker only adds to a step
(the polynomial grows with batched tokens, and a decode part adds time), so no placement beats this.

The cache hit is bounded too: a block can be reused only after an earlier request computed it, so the
most any request can find cached is the longest prefix of its blocks seen in any earlier request
(an infinite cache on every worker, no eviction, whole blocks, all but the last token). Rows:

    no cache        every prompt prefilled in full
    infinite cache  the most hit any router and cache size could give (37.3% of prompt tokens)

and, beside them, the "KV-aware router" issue's TTFT targets: 20% below Dynamo 1.6.1's KV router on
this trace (p90 / p99 887 / 2,004 ms at 4 workers, 555 / 1,688 ms at 8; ../shared/bench/dynamo-cpu.md).
A target below the infinite-cache floor cannot be met by any router with these engine settings.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tandem.bench.traces import MOONCAKE_BLOCK_SIZE, load_mooncake
from tandem.engines.sim.timing import PolynomialTiming

DYNAMO_TTFT_MS = {4: (887.0, 2004.0), 8: (555.0, 1688.0)}
"""Dynamo 1.6.1 KV router on the full trace, TTFT p90 / p99 (the issue's figures)."""
TARGET_FACTOR = 0.8


def alone_ttft_ms(uncached_tokens: int, batched_tokens: int, timing: PolynomialTiming) -> float:
    """Prefill of `uncached_tokens` on an idle worker: one chunk of at most `batched_tokens` a step."""
    ms = 0.0
    left = uncached_tokens
    while left > 0:
        chunk = min(left, batched_tokens)
        ms += timing.prefill_ms(chunk)
        left -= chunk
    return ms


def floors(batched_tokens: int) -> dict[str, tuple[np.ndarray, float]]:
    """Per-request floor TTFTs (ms) and the hit rate behind them, for each cache bound."""
    timing = PolynomialTiming()
    seen: set[int] = set()
    none: list[float] = []
    best: list[float] = []
    hit_tokens = prompt_tokens = 0
    for r in load_mooncake():
        matched = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            matched += 1
        seen.update(r.hash_ids)
        cached = min(matched, (r.input_len - 1) // MOONCAKE_BLOCK_SIZE) * MOONCAKE_BLOCK_SIZE
        none.append(alone_ttft_ms(r.input_len, batched_tokens, timing))
        best.append(alone_ttft_ms(r.input_len - cached, batched_tokens, timing))
        hit_tokens += cached
        prompt_tokens += r.input_len
    return {
        "no cache": (np.array(none), 0.0),
        "infinite cache": (np.array(best), 100.0 * hit_tokens / prompt_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batched-tokens", type=int, default=8192, help="max batched tokens a step")
    args = parser.parse_args(argv)
    rows = floors(args.batched_tokens)
    print("| cache bound | hit % | floor TTFT p50 / p90 / p99 ms |")
    print("| --- | --- | --- |")
    for name, (ttft, hit) in rows.items():
        p50, p90, p99 = np.percentile(ttft, [50, 90, 99])
        print(f"| {name} | {hit:.2f} | {p50:,.1f} / {p90:,.1f} / {p99:,.1f} |")
    best = rows["infinite cache"][0]
    f90, f99 = np.percentile(best, [90, 99])
    print()
    print("| workers | target TTFT p90 / p99 ms (Dynamo x 0.8) | infinite-cache floor p90 / p99 | feasible |")
    print("| --- | --- | --- | --- |")
    for workers, (d90, d99) in DYNAMO_TTFT_MS.items():
        t90, t99 = d90 * TARGET_FACTOR, d99 * TARGET_FACTOR
        ok = f90 <= t90 and f99 <= t99
        missed = [name for name, floor, target in (("p90", f90, t90), ("p99", f99, t99)) if floor > target]
        why = "yes" if ok else f"no: the {' and '.join(missed)} target is below the floor"
        print(f"| {workers} | {t90:,.0f} / {t99:,.0f} | {f90:,.0f} / {f99:,.0f} | {why} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

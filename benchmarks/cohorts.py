r"""Closed-loop cohorts, live: how many requests share each prefill step, Tandem vs Dynamo 1.6.1.

    .venv/bin/python benchmarks/cohorts.py [--systems tandem-ll,dynamo-nodelay@least-loaded] \
        [--concurrency 16]

The serving benchmark's workload (chat prompts of 100 tokens, 50 output tokens, 2 workers, speed-up 1)
on a closed loop, driven by Tandem's load generator in this process (one client for both systems).
Requests whose first tokens reach the client within 1.5 ms of each other were prefilled in the same
engine step (steps are >= 5.7 ms apart), so the sizes of those groups show whether each worker's
requests stay one cohort (c / 2 per group), split in a fixed pattern, or scatter over many steps.
Also shown: the send bursts (requests sent < 3 ms apart: the replacements a finishing cohort
releases) and how widely each group's requests were sent.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import serving_vs_dynamo as svd

from tandem.bench.loadgen import LoadConfig, chat_jobs, run_load
from tandem.bench.report import RequestRecord

SAME_STEP_S = 0.0015
BURST_GAP_S = 0.003


def groups(values: list[float], gap: float) -> list[list[float]]:
    values = sorted(values)
    out = [[values[0]]]
    for v in values[1:]:
        if v - out[-1][-1] < gap:
            out[-1].append(v)
        else:
            out.append([v])
    return out


def analyse(records: list[RequestRecord]) -> dict[str, object]:
    ok = sorted((r for r in records if r.ok), key=lambda r: r.chunk_times[0])
    steps: list[list[RequestRecord]] = [[ok[0]]]
    for r in ok[1:]:
        if r.chunk_times[0] - steps[-1][-1].chunk_times[0] < SAME_STEP_S:
            steps[-1].append(r)
        else:
            steps.append([r])
    sizes = Counter(len(g) for g in steps)
    spreads = [(max(r.t_start for r in g) - min(r.t_start for r in g)) * 1e3 for g in steps if len(g) > 1]
    bursts = groups([r.t_start for r in ok], BURST_GAP_S)
    return {
        "groups": len(steps),
        "mean_size": len(ok) / len(steps),
        "sizes": dict(sorted(sizes.items())),
        "group_send_spread_ms": statistics.median(spreads) if spreads else 0.0,
        "burst_size": statistics.mean(len(b) for b in bursts),
        "burst_spread_ms": statistics.median((b[-1] - b[0]) * 1e3 for b in bursts if len(b) > 1),
        "itl_p50_ms": statistics.median(t for r in ok if (t := r.tpot) is not None) * 1e3,
    }


def measure(system: str, args: argparse.Namespace) -> dict[str, object]:
    ns = argparse.Namespace(
        model=args.model, port=args.port, workers=2, dynamo=args.dynamo, dynamo_router="round-robin"
    )
    with svd.running(ns, 1.0, system, Path(tempfile.mkdtemp(prefix="cohorts-"))) as dep:
        c = args.concurrency
        jobs = chat_jobs(args.requests + 2 * c, 100, 50, tokenizer_dir=args.model, seed=1)
        config = LoadConfig(dep.url, "tiny", concurrency=c, warmup=2 * c)
        return analyse(asyncio.run(run_load(config, jobs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svd.add_install_args(ap)
    ap.add_argument("--systems", default="tandem-ll,dynamo-nodelay@least-loaded")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=480)
    ap.add_argument("--port", type=int, default=8761)
    args = ap.parse_args()
    rows = [(s, measure(s, args)) for s in args.systems.split(",")]
    print(f"c={args.concurrency}, {args.requests} requests; a group: first tokens that came together")
    print("| system | ITL p50 ms | groups | mean size | group sizes (size: count) | group's send spread ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, a in rows:
        print(
            f"| {s} | {a['itl_p50_ms']:.2f} | {a['groups']} | {a['mean_size']:.2f} | {a['sizes']} | "
            f"{a['group_send_spread_ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

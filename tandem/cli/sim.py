"""`tandem sim`: replay a workload trace through simulated workers on a virtual clock.

    tandem sim --workers 4 --router round-robin --limit 1000
    tandem sim --workers 4 8 --router all --out results.json
    tandem sim --trace random --input-len 114 --output-len 50 --limit 4000 --concurrency 64 \
        --workers 2 --block-size 64 --num-blocks 16384      # closed loop, like a benchmark client

Prints one row per (router, workers): hit %, TTFT p50/p90/p99, ITL p50/p99, E2E p50/p99, req/s,
requests the router refused (busy limits), wall s.
`benchmarks/replay_mooncake.py` is the same command as a script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tandem.cli.router_args import add_kv_policy_args, add_queue_args, kv_policy_from_args

ROUTER_NAMES = ("round-robin", "random", "least-loaded", "kv")


def add_replay_args(p: argparse.ArgumentParser) -> None:
    """The replay options, shared with `benchmarks/replay_mooncake.py`."""
    p.add_argument("--trace", default="mooncake", help="mooncake, azure, random, or a .jsonl/.csv path")
    p.add_argument("--input-len", type=int, default=100, help="random trace: prompt tokens")
    p.add_argument("--output-len", type=int, default=50, help="random trace: output tokens")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="closed loop: keep this many requests in flight, ignoring arrival times",
    )
    p.add_argument("--trace-dir", default=None, help="folder of named traces (default ../shared/...)")
    p.add_argument("--workers", type=int, nargs="+", default=[4], help="fleet sizes to run")
    p.add_argument("--router", nargs="+", default=["round-robin"], help=f"{', '.join(ROUTER_NAMES)} or all")
    p.add_argument("--limit", type=int, default=None, help="first N requests only")
    p.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this")
    p.add_argument("--length-divisor", type=int, default=1, help="divide lengths and block size by this")
    p.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=None, help="default: trace block size / divisor")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--engine-speedup", type=float, default=1.0, help="divide modelled step times")
    p.add_argument("--timing-profile", default=None, help="ProfileTiming JSON instead of polynomials")
    p.add_argument("--out", default=None, help="write all summaries as JSON here")
    add_kv_policy_args(p)
    add_queue_args(p)


def run_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every (router, workers) pair the arguments name; print the table; return the summaries."""
    from tandem.sim.replay import ReplaySpec, load_trace, replay

    routers = list(ROUTER_NAMES) if args.router == ["all"] else args.router
    spec = ReplaySpec(
        trace=args.trace,
        trace_dir=args.trace_dir,
        limit=args.limit,
        arrival_speedup=args.speedup,
        length_divisor=args.length_divisor,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        engine_speedup=args.engine_speedup,
        timing_profile=args.timing_profile,
        input_len=args.input_len,
        output_len=args.output_len,
        concurrency=args.concurrency,
        router_queue_size=args.router_queue_size,
        router_queue_timeout=args.router_queue_timeout,
    )
    requests = load_trace(spec)
    kv_policy = kv_policy_from_args(args)
    suffix = " (" + ", ".join(f"{k} {v:g}" for k, v in kv_policy.items()) + ")" if kv_policy else ""
    results = []
    print(header())
    for router in routers:
        for workers in args.workers:
            s = replay(spec, workers, router, requests, kv_policy).summary()
            s.update(router=router + suffix, workers=workers, kv_policy=kv_policy)
            results.append(s)
            print(row(s), flush=True)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.out).write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    return results


def header() -> str:
    cols = ["router", "workers", "hit %", "TTFT p50/p90/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 ms"]
    cols += ["req/s", "refused", "wall s"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def row(s: dict[str, Any]) -> str:
    refused = s.get("router_shed", 0) + s.get("router_timeouts", 0)
    if not s.get("completed"):
        return f"| {s['router']} | {s['workers']} | - | - | - | - | - | {refused} | {s['wall_s']:.1f} |"
    return (
        f"| {s['router']} | {s['workers']} | {100 * s['hit_rate']:.1f} "
        f"| {s['ttft_p50_ms']:,.0f} / {s['ttft_p90_ms']:,.0f} / {s['ttft_p99_ms']:,.0f} "
        f"| {s['itl_p50_ms']:.2f} / {s['itl_p99_ms']:.1f} "
        f"| {s['e2e_p50_ms']:,.0f} / {s['e2e_p99_ms']:,.0f} "
        f"| {s['request_throughput']:.2f} | {refused} | {s['wall_s']:.1f} |"
    )


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sim", help="replay a trace through simulated workers (virtual clock)")
    add_replay_args(p)
    p.set_defaults(func=lambda args: run_from_args(args) and 0)

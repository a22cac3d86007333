"""`tandem bench`: load a running OpenAI-compatible server and report TTFT / ITL / TPOT / E2E / goodput.

    tandem bench --url http://127.0.0.1:8000 --model tiny --concurrency 16 --requests 2000 --isl 100 --osl 50
    tandem bench --model tiny --rate 20 --requests 600                         # open loop, Poisson
    tandem bench --model tiny --trace mooncake --time-scale 10 --length-divisor 16 --limit 1000
    tandem bench --model tiny --chat --tokenizer DIR ...                       # chat text prompts

Prints a table; `--out FILE` also writes the JSON report (with the run's settings under "config").
Against a Tandem frontend it also prints the engines' means over the run (queue, prefill, ITL, from
the server's /metrics) and what the serving path added on top (`tandem.bench.engine_share`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="load generator: latency, throughput and goodput of a server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name the server serves")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="closed loop with C in flight")
    load.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, req/s")
    p.add_argument("--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight")
    p.add_argument("--requests", type=int, default=500, help="measured requests (synthetic)")
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests sent first")
    p.add_argument("--isl", type=int, default=100, help="synthetic prompt tokens")
    p.add_argument("--osl", type=int, default=50, help="synthetic output tokens (ignore_eos)")
    p.add_argument("--chat", action="store_true", help="chat text prompts (needs --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="model folder: vocab size / chat prompt text")
    p.add_argument("--vocab-size", type=int, default=None, help="random ids below this (default: model's)")
    p.add_argument("--trace", default=None, help="mooncake | azure | PATH (.jsonl Mooncake, .csv Azure)")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace: replay this many times faster")
    p.add_argument("--length-divisor", type=int, default=1, help="trace: divide lengths by this")
    p.add_argument("--limit", type=int, default=None, help="trace: first N requests")
    p.add_argument("--max-prompt-len", type=int, default=None, help="trace: cut prompts to this")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument(
        "--server-timing",
        action="store_true",
        help='ask for each request\'s server-side timing (nvext "timing": Tandem, NVIDIA Dynamo) and '
        "split TTFT into outside the server, intake, and dispatch to first token",
    )
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(func=run)


def _jobs(args: argparse.Namespace) -> list[Any]:
    from tandem.bench import loadgen, traces

    n = args.requests + args.warmup
    if args.trace is not None:
        lo, hi = loadgen.vocab_range(args.tokenizer)
        if args.vocab_size:
            hi = args.vocab_size
        kind = args.trace.lower()
        path = None if kind in ("mooncake", "azure") else args.trace
        is_azure = kind == "azure" or (path is not None and path.endswith(".csv"))
        load = traces.load_azure if is_azure else traces.load_mooncake
        limit = None if args.limit is None else args.limit + args.warmup
        reqs = load(
            path,
            speedup=args.time_scale,
            length_divisor=args.length_divisor,
            limit=limit,
            vocab=(lo, hi),
            seed=args.seed,
        )
        return loadgen.trace_jobs(reqs, max_prompt_len=args.max_prompt_len)
    if args.chat:
        if args.tokenizer is None:
            raise ValueError("--chat needs --tokenizer DIR (to make prompts of exactly --isl tokens)")
        jobs = loadgen.chat_jobs(n, args.isl, args.osl, tokenizer_dir=args.tokenizer, seed=args.seed)
    else:
        lo, hi = loadgen.vocab_range(args.tokenizer)
        if args.vocab_size:
            hi = args.vocab_size
        jobs = loadgen.synthetic_jobs(n, args.isl, args.osl, vocab=(lo, hi), seed=args.seed)
    if args.rate is not None:
        jobs = jobs[: args.warmup] + loadgen.poisson_arrivals(jobs[args.warmup :], args.rate, seed=args.seed)
    return jobs


def run(args: argparse.Namespace) -> int:
    from tandem.bench.engine_share import EngineTotals, engine_share, format_share, scrape
    from tandem.bench.loadgen import LoadConfig, run_load
    from tandem.bench.report import Slo, format_table, summarize
    from tandem.cli.worker import run_event_loop

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("tandem bench: needs aiohttp (pip install 'tandem[bench]')", file=sys.stderr)
        return 2

    try:
        jobs = _jobs(args)
        concurrency = args.concurrency
        if concurrency is None and args.rate is None and args.trace is None:
            concurrency = 1
        config = LoadConfig(
            url=args.url,
            model=args.model,
            concurrency=concurrency,
            max_concurrency=args.max_concurrency,
            warmup=args.warmup,
            timeout_s=args.timeout,
            server_timing=args.server_timing,
        )
        slo = Slo(ttft_s=args.slo_ttft_ms / 1e3, tpot_s=args.slo_tpot_ms / 1e3)
    except (ValueError, OSError) as e:
        print(f"tandem bench: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        scrapes: list[EngineTotals | None] = []

        async def engines(session: Any) -> None:  # a Tandem server's engine phases, before and after
            scrapes.append(await scrape(session, args.url))

        records = await run_load(config, jobs, engines)
        report = summarize(records, slo)
        report["engine"] = engine_share(scrapes[0], scrapes[1], report) if len(scrapes) == 2 else None
        mode = f"closed loop c={concurrency}" if concurrency else "open loop"
        if args.rate is not None:
            mode += f" at {args.rate} req/s"
        print(format_table(report, f"tandem bench: {args.url} model {args.model}, {mode}"), flush=True)
        if report["engine"] is not None:
            print(format_share(report["engine"]), flush=True)
        if args.out:
            settings = {k: v for k, v in vars(args).items() if k != "func"}
            with open(args.out, "w") as f:
                json.dump({**report, "config": settings}, f, indent=1)
        return 0 if report["completed"] else 1

    return run_event_loop(main())

"""Prefill/decode interference: do long prompts stall the short requests' tokens?

Same hardware both ways, each worker pinned to one of the 2 cores:
  agg     2 aggregated workers (cores 0, 1): a long prompt's prefill runs in the steps of whichever
          worker gets it, between the decode steps of that worker's short requests
  disagg  1 prefill worker (core 0) + 1 decode worker (core 1): long prompts prefill on core 0 and
          their KV moves over shared memory; short prompts prefill on the decode worker (conditional
          disaggregation, threshold --disagg-min)
Load: --short-concurrency closed-loop streams of short completions (token-id prompts, ignore_eos),
plus one long prompt every --long-every seconds. Reports TTFT and inter-token gaps of the short
requests (p50/p99) and the long requests' TTFT, then disagg / agg ratios.

    .venv/bin/python benchmarks/interference.py --model ~/.cache/tandem/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def deployment(mode: str, model: str, port: int, disagg_min: int, budget: int) -> dict:
    args = {"block_size": 16, "max_num_batched_tokens": budget, "max_num_seqs": 64}
    if mode == "agg":
        pools = [{"name": "agg", "role": "agg", "replicas": 2, "cpus": [0, 1], "engine_args": args}]
    else:
        pools = [
            {"name": "prefill", "role": "prefill", "replicas": 1, "cpus": [0], "engine_args": args},
            {"name": "decode", "role": "decode", "replicas": 1, "cpus": [1], "engine_args": args},
        ]
    return {
        "name": f"interference-{mode}",
        "model": {"path": model, "served_name": "m"},
        "frontend": {"host": "127.0.0.1", "port": port},
        "router": {"policy": "least-loaded", "disagg_min_prompt_tokens": disagg_min},
        "pools": pools,
    }


async def stream(
    client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int
) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) of one streamed completion, in seconds."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    start = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[0] - start, gaps


async def load(port: int, args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = random.Random(0)
    short_ttft: list[float] = []
    short_gaps: list[float] = []
    long_ttft: list[float] = []
    deadline = time.perf_counter() + args.duration

    async def short_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            prompt = [rng.randrange(100, 40000) for _ in range(args.short_tokens)]
            ttft, gaps = await stream(client, url, prompt, args.short_output)
            short_ttft.append(ttft)
            short_gaps.extend(gaps)

    async def long_loop(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(args.long_every / 2)
        while time.perf_counter() < deadline:
            prompt = [rng.randrange(100, 40000) for _ in range(args.long_tokens)]
            t = time.perf_counter()
            ttft, _ = await stream(client, url, prompt, 4)
            long_ttft.append(ttft)
            await asyncio.sleep(max(0.0, args.long_every - (time.perf_counter() - t)))

    limits = httpx.Limits(max_connections=args.short_concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await stream(client, url, list(range(100, 100 + args.long_tokens)), 2)  # warm both paths
        await asyncio.gather(long_loop(client), *[short_loop(client) for _ in range(args.short_concurrency)])
    ms = 1000.0
    return {
        "short_requests": len(short_ttft),
        "short_ttft_p50": pct(short_ttft, 0.5) * ms,
        "short_ttft_p99": pct(short_ttft, 0.99) * ms,
        "itl_p50": pct(short_gaps, 0.5) * ms,
        "itl_p99": pct(short_gaps, 0.99) * ms,
        "itl_mean": statistics.fmean(short_gaps) * ms if short_gaps else float("nan"),
        "long_requests": len(long_ttft),
        "long_ttft_p50": pct(long_ttft, 0.5) * ms,
    }


def run_mode(mode: str, args: argparse.Namespace, port: int) -> dict:
    spec = deployment(mode, args.model, port, args.disagg_min, args.budget)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec, f)
    log = open(Path(tempfile.gettempdir()) / f"interference-{mode}.log", "w")
    cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", "WARNING", "serve", "-f", f.name]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"tandem serve exited; see {log.name}")
            if "Tandem ready" in Path(log.name).read_text():
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("tandem serve did not become ready")
        return asyncio.run(load(port, args))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--short-concurrency", type=int, default=4)
    ap.add_argument("--short-tokens", type=int, default=64)
    ap.add_argument("--short-output", type=int, default=48)
    ap.add_argument("--long-tokens", type=int, default=2048)
    ap.add_argument("--long-every", type=float, default=4.0)
    ap.add_argument(
        "--disagg-min", type=int, default=512, help="prompts shorter prefill on the decode worker"
    )
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens of every worker")
    ap.add_argument("--port", type=int, default=8130)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {mode: run_mode(mode, args, args.port + i) for i, mode in enumerate(("agg", "disagg"))}
    cols = ["short_requests", "short_ttft_p50", "short_ttft_p99", "itl_p50", "itl_p99", "itl_mean",
            "long_requests", "long_ttft_p50"]  # fmt: skip
    print("| mode | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for mode, r in results.items():
        print(
            f"| {mode} | "
            + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
            + " |"
        )
    a, d = results["agg"], results["disagg"]
    ratio = {k: d[k] / a[k] for k in ("itl_p99", "itl_p50", "short_ttft_p99", "long_ttft_p50")}
    print("\ndisagg / agg: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""A host stall in the engine process: what a stream loses, Tandem's simulated engine vs Dynamo's mocker.

    .venv/bin/python benchmarks/host_stall.py --stall-ms 20 --streams 12

The serving comparison (`serving_vs_dynamo.py`) measures what each system's serving path adds on
top of the engine's own steps, so both engines must model the steps alike, host stalls included:
on a 2-vCPU VM a thread's wake-up now and then runs 5-15 ms late, and such a stall in the engine's
step loop lands in ITL. This pauses the engine processes (SIGSTOP, then SIGCONT after `--stall-ms`)
once per stream, after its 15th token, and reports how much longer the stream took than the
unpaused ones (c=1, 50 output tokens, speed-up 1, 2 workers: the serving benchmark's c=1 point).

An engine that schedules asynchronously (vLLM v1, SGLang's overlap scheduler) keeps one step
queued, so a stall of S ms costs S less one step; an engine that restarts its clock after every
host delay loses all S. Client: the official `openai` package.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

try:  # run as a script (benchmarks/ is on sys.path), or imported as benchmarks.*
    from serving_vs_dynamo import Deployment, add_deployment_args, add_install_args, running
except ImportError:
    from benchmarks.serving_vs_dynamo import Deployment, add_deployment_args, add_install_args, running

PAUSE_AFTER = 15
"""Tokens into a stream when the engine processes are paused."""


def engine_pids(dep: Deployment) -> list[int]:
    """Tandem: its worker processes; Dynamo: the mocker (frontends keep running)."""
    pids = dep.pids()
    if "mocker" in pids:
        return [pids["mocker"]]
    return [pid for name, pid in pids.items() if "_child" in name]


def stream(client: OpenAI, pause: list[int], stall_s: float) -> tuple[float, list[float]]:
    """One 50-token chat stream: (first to last token in ms, the gaps in ms); pauses `pause`."""
    times: list[float] = []
    chunks = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a stalled host " * 25}],
        max_tokens=50,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            if len(times) == PAUSE_AFTER and pause:
                for pid in pause:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    time.sleep(stall_s)
                finally:
                    for pid in pause:
                        os.kill(pid, signal.SIGCONT)
    gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    return (times[-1] - times[0]) * 1e3, gaps


def measure(dep: Deployment, streams: int, stall_s: float) -> dict[str, float]:
    client = OpenAI(base_url=dep.url + "/v1", api_key="unused", max_retries=0)
    pids = engine_pids(dep)
    assert pids, f"{dep.name}: no engine process found"
    for _ in range(4):  # warm-up
        stream(client, [], 0.0)
    plain, stalled, after = [], [], []
    for i in range(2 * streams):  # alternate, so drift hits both alike
        total, gaps = stream(client, pids if i % 2 else [], stall_s)
        if i % 2:
            stalled.append(total)
            after.append(gaps[PAUSE_AFTER])  # the token right after the stalled one
        else:
            plain.append(total)
    lost = statistics.median(stalled) - statistics.median(plain)
    return {
        "plain": statistics.median(plain),
        "stalled": statistics.median(stalled),
        "lost": lost,
        "recovered": stall_s * 1e3 - lost,
        "next_gap": statistics.median(after),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_install_args(ap)
    ap.add_argument("--systems", default="tandem-ll,dynamo-nodelay@least-loaded")
    ap.add_argument("--stall-ms", type=float, default=20.0)
    ap.add_argument("--streams", type=int, default=12, help="streams with a stall (as many without)")
    add_deployment_args(ap, dynamo_router="least-loaded")
    args = ap.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="host-stall-"))
    print(f"logs in {out_dir}; a {args.stall_ms:g} ms pause of the engine processes per stream", flush=True)
    rows = {}
    for system in args.systems.split(","):
        with running(args, 1.0, system, out_dir) as dep:
            rows[system] = measure(dep, args.streams, args.stall_ms / 1e3)
    head = f"{'stream ms':>10s} {'stalled':>9s} {'lost':>7s} {'recovered':>10s} {'next gap':>9s}"
    print(f"\n{'system':32s} {head}")
    for system, r in rows.items():
        print(
            f"{system:32s} {r['plain']:10.1f} {r['stalled']:9.1f} {r['lost']:7.1f} "
            f"{r['recovered']:10.1f} {r['next_gap']:9.2f}"
        )
    print("(medians; lost: stalled - plain stream time; recovered: stall - lost; next gap: the token after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

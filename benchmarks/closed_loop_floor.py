"""The engines' own latency under a closed loop: Tandem's fleet simulator vs Dynamo 1.6.1's offline
replay, both on a virtual clock, no HTTP, no framework.

    .venv/bin/python benchmarks/closed_loop_floor.py [--concurrency 1,16,64] [--requests 4000]
    .venv/bin/python benchmarks/closed_loop_floor.py --frontend-model    # + the table described below

The serving benchmark's workload (`serving_vs_dynamo.py`): 114 prompt tokens (100 + the chat
template), 50 output tokens, 2 workers, round-robin, block size 64, 16,384 blocks, 256 sequences,
8,192 batched tokens, Dynamo's polynomial timing; C requests in flight, each finished request
replaced at once (the referee client's loop with zero latency). Tandem: `Fleet.run(concurrency=C)`;
Dynamo: `dynamo.replay.run_synthetic_trace_replay(replay_concurrency=C)` in Dynamo's venv.

What it shows: whether the two schedulers batch a closed loop the same way, and the TTFT and
TPOT each engine gives on its own at each concurrency, the floor that a live run's figures are
measured against ("latency the framework adds").

`--frontend-model` adds a second table, Tandem's engine only, c=64: what a live client and
frontend do to that floor. Each finish reaches the engine as a new request only after a modelled
frontend turns it around: one request at a time, S us each (a single-threaded intake), plus uniform
jitter up to J ms; round-robin vs least-loaded routing.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from pathlib import Path

from tandem.bench.traces import TraceRequest
from tandem.sim.fleet import Fleet
from tandem.sim.replay import ReplaySpec, fleet_config, replay
from tandem.sim.routing import make_router

ISL, OSL, WORKERS = 114, 50, 2
ENGINE = {"block_size": 64, "num_blocks": 16384, "max_num_seqs": 256, "max_num_batched_tokens": 8192}
FIELDS = ("req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")
KEYS = ("request_throughput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
"""The summary fields behind FIELDS (`RunMetrics.summary`)."""

# Runs in Dynamo's venv; prints the summary fields as JSON.
DYNAMO = """
import json, os, sys
os.environ.setdefault("DYN_LOG", "warn")
from dynamo.mocker.config import normalize_mocker_config
from dynamo.replay import run_synthetic_trace_replay
isl, osl, n, c, w, bs, blocks, seqs, batched = map(int, sys.argv[1:])
engine = normalize_mocker_config({"engine": {"block_size": bs, "num_gpu_blocks": blocks,
    "max_num_seqs": seqs, "max_num_batched_tokens": batched}})
s = run_synthetic_trace_replay(isl, osl, n, extra_engine_args=engine, num_workers=w,
    replay_concurrency=c, router_mode="round_robin", replay_mode="offline").summary
print(json.dumps([s["request_throughput_rps"], s["median_ttft_ms"], s["p99_ttft_ms"],
    s["median_tpot_ms"], s["p99_tpot_ms"]]))
"""


def spec_for(c: int, n: int) -> ReplaySpec:
    return ReplaySpec(
        trace="random",
        input_len=ISL,
        output_len=OSL,
        limit=n,
        concurrency=c,
        block_size=ENGINE["block_size"],
        num_blocks=ENGINE["num_blocks"],
        max_num_seqs=ENGINE["max_num_seqs"],
        max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
    )


def tandem(c: int, n: int) -> list[float]:
    s = replay(spec_for(c, n), WORKERS, "round-robin").summary()
    return [s[k] for k in KEYS]


def dynamo(python: str, c: int, n: int) -> list[float]:
    argv = [ISL, OSL, n, c, WORKERS, *ENGINE.values()]
    out = subprocess.run([python, "-c", DYNAMO, *map(str, argv)], check=True, capture_output=True, text=True)
    return [float(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


class SerialFrontend:
    """Turns each finish at t into an arrival at the engine: one at a time, `intake_s` each, then
    up to `jitter_s` more (uniform, seeded)."""

    def __init__(self, intake_s: float, jitter_s: float, seed: int = 1) -> None:
        self.intake, self.jitter, self.free = intake_s, jitter_s, 0.0
        self.rng = random.Random(seed)

    def __call__(self, t: float) -> float:
        self.free = max(t, self.free) + self.intake
        return self.free + self.rng.uniform(0.0, self.jitter)


def frontend_table(n: int) -> None:
    print("\n| intake us / jitter ms | router | " + " | ".join(FIELDS) + " |\n|" + "---|" * (len(FIELDS) + 2))
    spec = spec_for(64, n)
    for intake_us, jitter_ms in ((0, 0), (0, 2), (200, 2), (400, 0), (400, 2), (800, 2)):
        for router in ("round-robin", "least-loaded"):
            reqs = [TraceRequest(0.0, ISL, OSL, index=i) for i in range(n)]
            fleet = Fleet(fleet_config(spec, WORKERS), make_router(router))
            frontend = SerialFrontend(intake_us / 1e6, jitter_ms / 1e3)
            s = fleet.run(reqs, concurrency=64, send_at=frontend).summary()
            row = [s[k] for k in KEYS]
            print(f"| {intake_us} / {jitter_ms} | {router} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--dynamo-python", default=str(Path.home() / ".cache/tandem/dynamo/venv/bin/python"))
    ap.add_argument("--frontend-model", action="store_true", help="also the modelled-frontend table")
    args = ap.parse_args()
    print("| c | engine | " + " | ".join(FIELDS) + " |\n|" + "---|" * (len(FIELDS) + 2))
    for c in (int(x) for x in args.concurrency.split(",")):
        rows = (
            ("Tandem", tandem(c, args.requests)),
            ("Dynamo", dynamo(args.dynamo_python, c, args.requests)),
        )
        for name, row in rows:
            print(f"| {c} | {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)
    if args.frontend_model:
        frontend_table(args.requests)


if __name__ == "__main__":
    main()

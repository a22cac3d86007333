"""The router live through `tandem serve` vs the fleet simulator: same trace slice, same settings.

    .venv/bin/python benchmarks/live_vs_sim.py [--limit 1200] [--time-scale 2] [--routers kv,round-robin]

Live: `tandem serve` (simulated engine, 4 worker processes, block size 32, 2,048 blocks, 256
sequences, 8,192 batched tokens, engine sped up S times) driven by `tandem bench` with the first N
requests of the Mooncake trace (lengths / 16, so a trace block is 32 tokens; arrivals S times
faster). Hit rate: the frontend's cached / prompt token counters. Simulated: the fleet simulator on
a virtual clock with the same slice and settings (`tandem sim --limit N --speedup S --engine-speedup S
--length-divisor 16`). Speeding arrivals and engine up by the same factor keeps the load's shape;
the live figures add what the HTTP path, the request plane and this machine's 2 cores cost.
Needs the tok8k model folder that `serving_vs_dynamo.py` makes (vocabulary 8,192, context 8,192).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from serve_proc import serving

from tandem.sim.replay import ReplaySpec, replay

REPO = Path(__file__).resolve().parents[1]
TANDEM = str(REPO / ".venv/bin/tandem")
MODEL = str(Path.home() / ".cache/tandem/bench/tok8k")
DIVISOR, WORKERS, BLOCK, BLOCKS = 16, 4, 32, 2048


def live(args: argparse.Namespace, router: str, out_dir: Path) -> dict[str, Any]:
    cmd = [TANDEM, "--log-level", "WARNING", "serve", "--model", args.model, "--served-model-name", "tiny"]
    cmd += ["--engine", "sim", "--workers", str(WORKERS), "--speedup", str(args.time_scale)]
    cmd += ["--port", str(args.port), "--router", router, "--block-size", str(BLOCK)]
    cmd += ["--num-blocks", str(BLOCKS), "--max-num-seqs", "256", "--max-num-batched-tokens", "8192"]
    with serving(cmd):
        url = f"http://127.0.0.1:{args.port}"
        report = out_dir / f"bench-{router}.json"
        bench = [TANDEM, "bench", "--url", url, "--model", "tiny", "--tokenizer", args.model]
        bench += ["--trace", "mooncake", "--time-scale", str(args.time_scale)]
        bench += ["--length-divisor", str(DIVISOR), "--limit", str(args.limit), "--out", str(report)]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        with urllib.request.urlopen(url + "/metrics") as r:
            metrics = r.read().decode()
        result: dict[str, Any] = json.loads(report.read_text())
        result["hit_rate"] = _counter(metrics, "cached_tokens") / max(_counter(metrics, "prompt_tokens"), 1)
        return result


def _counter(metrics: str, name: str) -> float:
    key = f"tandem_frontend_{name}_total "
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(key))


def simulated(args: argparse.Namespace, router: str) -> dict[str, Any]:
    spec = ReplaySpec(
        limit=args.limit,
        arrival_speedup=args.time_scale,
        engine_speedup=args.time_scale,
        length_divisor=DIVISOR,
        block_size=BLOCK,
        num_blocks=BLOCKS,
    )
    return replay(spec, WORKERS, router).summary()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1200)
    ap.add_argument("--time-scale", type=float, default=2.0, help="arrivals and engine S times faster")
    ap.add_argument("--routers", default="kv,round-robin")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="live-vs-sim-"))
    print(f"raw reports in {out_dir}", flush=True)
    cols = "| router | run | hit % | TTFT p50 / p90 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms | done |"
    rows = [cols, "|" + "---|" * 7]
    for router in args.routers.split(","):
        t0 = time.monotonic()
        lv = live(args, router, out_dir)
        sm = simulated(args, router)
        ttft, itl, e2e = lv["ttft_ms"], lv["itl_ms"], lv["e2e_ms"]
        rows.append(
            f"| {router} | live | {100 * lv['hit_rate']:.1f} | {ttft['p50']:.1f} / {ttft['p90']:.1f} / "
            f"{ttft['p99']:.1f} | {itl['p50']:.2f} / {itl['p99']:.2f} | {e2e['p50']:,.0f} / "
            f"{e2e['p99']:,.0f} | {lv['completed']}/{lv['requests']} |"
        )
        rows.append(
            f"| {router} | simulated | {100 * sm['hit_rate']:.1f} | {sm['ttft_p50_ms']:.1f} / "
            f"{sm['ttft_p90_ms']:.1f} / {sm['ttft_p99_ms']:.1f} | {sm['itl_p50_ms']:.2f} / "
            f"{sm['itl_p99_ms']:.2f} | {sm['e2e_p50_ms']:,.0f} / {sm['e2e_p99_ms']:,.0f} "
            f"| {sm['completed']}/{sm['num_requests']} |"
        )
        print(f"{router}: {time.monotonic() - t0:.0f} s", flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving benchmark's workload as an open loop: Poisson arrivals at fixed rates, Tandem against
NVIDIA Dynamo 1.6.1 with the same arrivals, the same prompts and the same client.

    .venv/bin/python benchmarks/open_loop_vs_dynamo.py [--rates 40,120] [--rounds 3]

Why: on a closed loop (`serving_vs_dynamo.py`) each finish sends the next request, so when requests
arrive depends on the system under test. At c=64 that feedback settles each run in a regime: a
worker's requests stay one cohort (few, large prefill steps: lower ITL, higher TTFT) or scatter
(the opposite), and the regime moves a run's TTFT p50 by more than the serving path costs
(docs/benchmarks.md, sessions 3-4 and 20). Arrivals that do not depend on the system take that
away: both systems get the same requests at the same instants, so a difference in TTFT or ITL is
what the system adds on top of the same engine timing model.

Same deployments as `serving_vs_dynamo.py` (2 workers, simulated engine / mocker at speed-up 1,
block size 64, 100 prompt tokens, 50 output tokens, one token per SSE chunk). The client is
`tandem bench --rate R --seed 7` (the referee client has no open-loop mode); ITL here is the gap
between chunks. Rounds alternate which system runs first; the last lines give, per rate, Tandem
minus Dynamo of the same round (median, rounds at or under, range).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

try:
    import serving_vs_dynamo as svd
    from serve_proc import cpu_seconds
    from serving_report import field_label, median_result, tandem_dynamo_pairs
except ImportError:  # imported as a package module (the tests)
    import benchmarks.serving_vs_dynamo as svd
    from benchmarks.serve_proc import cpu_seconds
    from benchmarks.serving_report import field_label, median_result, tandem_dynamo_pairs

FIELDS = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99"))


def run_rate(args: argparse.Namespace, dep: svd.Deployment, rate: float, out: Path) -> dict[str, Any]:
    n = max(1, round(rate * args.seconds))
    cmd = [str(svd.REPO / ".venv/bin/tandem"), "bench", "--url", dep.url, "--model", "tiny", "--chat"]
    cmd += ["--tokenizer", args.model, "--rate", str(rate), "--requests", str(n)]
    cmd += ["--warmup", str(max(1, n // 20)), "--isl", "100", "--osl", "50", "--seed", "7"]
    cmd += ["--out", str(out)]
    pids = dep.pids()
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    client = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(out.read_text())
    # The stack's CPU per request (warm-up included in both): on 2 cores, what the servers burn is
    # what the client and the other processes wait for as they wake.
    spent = sum(cpu_seconds(pid) - before[k] for k, pid in pids.items())
    report["stack_cpu_ms_per_request"] = 1000 * spent / (n + max(1, n // 20))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - client.ru_utime - client.ru_stime
    report["client_cpu_ms_per_request"] = 1000 * used / (n + max(1, n // 20))
    if report["errors"]:
        raise RuntimeError(f"{dep.name} at {rate} req/s: {report['errors']} errors: {report['first_error']}")
    return report


def line(name: str, rate: float, r: dict[str, Any]) -> str:
    t, i = r["ttft_ms"], r["itl_ms"]
    return (
        f"{name:30s} {rate:6g} {r['req_per_s']:8.1f} {t['p50']:8.2f} {t['p99']:8.2f} "
        f"{i['p50']:7.2f} {i['p99']:7.2f} {r.get('stack_cpu_ms_per_request', float('nan')):8.2f} "
        f"{r.get('client_cpu_ms_per_request', float('nan')):8.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svd.add_install_args(ap)
    ap.add_argument("--systems", default="tandem-ll,dynamo-nodelay@least-loaded")
    ap.add_argument("--rates", default="40,120", help="req/s (2 workers serve ~155 at most here)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured arrivals per point, in seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dynamo-router", default="round-robin")
    args = ap.parse_args()
    systems = args.systems.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    out_dir = Path(tempfile.mkdtemp(prefix="open-loop-vs-dynamo-"))
    print(f"raw reports and logs in {out_dir}", flush=True)
    head = (
        f"{'system':30s} {'rate':>6s} {'req/s':>8s} {'TTFT50':>8s} {'TTFT99':>8s} {'ITL50':>7s} {'ITL99':>7s}"
        f" {'stackCPU':>8s} {'clntCPU':>8s}"
    )
    print(head, flush=True)
    runs = svd.alternating_rounds(args, systems, rates, partial(run_rate, args), line, out_dir)
    print(f"\nmedians over {args.rounds} rounds\n{head}")
    for rate in rates:
        for s in systems:
            print(line(s, rate, median_result(runs[(s, rate)])))
    print("\nround by round (Tandem - Dynamo, ms)")
    for ts, ds in tandem_dynamo_pairs(systems):
        for rate in rates:
            parts = []
            for key, p in FIELDS:
                d = [a[key][p] - b[key][p] for a, b in zip(runs[(ts, rate)], runs[(ds, rate)], strict=True)]
                ahead = sum(1 for v in d if v <= 0)
                parts.append(
                    f"{field_label(key, p)} {statistics.median(d):+.2f} ({ahead}/{len(d)} at or under, "
                    f"{min(d):+.2f}..{max(d):+.2f})"
                )
            print(f"  {rate:g} req/s {ts} - {ds}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where each system's TTFT goes, Tandem against NVIDIA Dynamo 1.6.1: the same requests, the same
client, and each server's own timing of every request.

    .venv/bin/python benchmarks/ttft_split.py [--concurrency 1,16,64] [--rates ...] [--rounds 3]

Both frontends report a request's timing when asked (`nvext.extra_fields: ["timing"]`; Tandem's in
`tandem.frontend.timing`, with Dynamo's fields and meanings). `tandem bench --server-timing` splits
each request's client-side TTFT with it:

    outside   the client's TTFT minus the server's: HTTP both ways, the server's HTTP layer before
              its handler, and the client's own delays (the same client for both systems)
    in        of that, the way in: the server's receipt (Unix ms) minus the client's send (both on
              this machine's clock; the server's whole milliseconds make it ~0.5 ms short for both)
    intake    the server's receipt to its dispatch to a worker: parse, chat template, tokenization,
              routing
    ->first   dispatch to the first token back in the frontend: the request plane both ways and the
              engine (its queue and prefill step)

Tandem's timing also carries each request's engine time (`engine_ttft_ms`: its queue and prefill on
the engine's clock), so against Tandem the last part splits into the engine and the request plane
around it, request by request (Dynamo reports no such field).

Same deployments and workload as `serving_vs_dynamo.py` (2 workers, simulated engine / mocker at
speed-up 1, 100 prompt tokens, 50 output tokens, one token per SSE chunk). Rounds alternate which
system runs first; the last lines give each part as Tandem minus Dynamo of the same round (median,
rounds at or under), for means and medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

try:
    import serving_vs_dynamo as svd
    from serving_report import tandem_dynamo_pairs
except ImportError:  # imported as a package module (the tests)
    import benchmarks.serving_vs_dynamo as svd
    from benchmarks.serving_report import tandem_dynamo_pairs

PARTS = (
    ("outside_ms", "outside"),
    ("way_in_ms", "in"),
    ("intake_ms", "intake"),
    ("dispatch_to_first_ms", "->first"),
)


def run_point(args: argparse.Namespace, dep: svd.Deployment, load: str, out: Path) -> dict[str, Any]:
    """`load`: "c=N" (closed loop) or "r=R" (Poisson arrivals, req/s)."""
    kind, _, value = load.partition("=")
    cmd = [str(svd.REPO / ".venv/bin/tandem"), "bench", "--url", dep.url, "--model", "tiny", "--chat"]
    cmd += ["--tokenizer", args.model, "--isl", "100", "--osl", "50", "--seed", "7", "--server-timing"]
    if kind == "c":
        n, warm = svd.counts(1.0, int(value), dep.name)
        cmd += ["--concurrency", value, "--requests", str(n), "--warmup", str(warm)]
    else:
        n = max(1, round(float(value) * args.seconds))
        cmd += ["--rate", value, "--requests", str(n), "--warmup", str(max(1, n // 20))]
    cmd += ["--out", str(out)]
    subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(out.read_text())
    if report["errors"] or not report.get("server"):
        raise RuntimeError(f"{dep.name} {load}: {report['errors']} errors, {report['first_error']}")
    return report


def parts(r: dict[str, Any], stat: str) -> dict[str, float]:
    """Client TTFT, and its parts, as `stat` ("mean" or "p50") over the run's requests."""
    out = {"ttft": r["ttft_ms"][stat]}
    out.update({name: r["server"][key][stat] for key, name in PARTS})
    if r["server"].get("engine_ms", {}).get(stat) is not None:  # per request (Tandem)
        out["engine"] = r["server"]["engine_ms"][stat]
        out["plane"] = r["server"]["plane_ms"][stat]
    return out


def line(name: str, load: str, r: dict[str, Any]) -> str:
    m, p = parts(r, "mean"), parts(r, "p50")
    cells = " ".join(f"{m[k]:8.2f} {p[k]:8.2f}" for k in ("ttft", "outside", "in", "intake", "->first"))
    engine = f"{m['engine']:8.2f} {m['plane']:8.2f}" if "engine" in m else f"{'-':>8s} {'-':>8s}"
    return f"{name:30s} {load:>7s} {r['req_per_s']:7.1f} {cells} {engine} {r['itl_ms']['p50']:6.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svd.add_install_args(ap)
    ap.add_argument("--systems", default="tandem-ll,dynamo-nodelay@least-loaded")
    ap.add_argument("--concurrency", default="1,16,64", help="closed-loop points ('' for none)")
    ap.add_argument("--rates", default="", help="open-loop points, req/s")
    ap.add_argument("--seconds", type=float, default=30.0, help="open loop: measured arrivals, seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count-scale", type=float, default=2.0, help="closed loop: x the serving benchmark's")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dynamo-router", default="round-robin")
    args = ap.parse_args()
    systems = args.systems.split(",")
    loads = [f"c={c}" for c in args.concurrency.split(",") if c]
    loads += [f"r={r}" for r in args.rates.split(",") if r]
    out_dir = Path(tempfile.mkdtemp(prefix="ttft-split-"))
    print(f"raw reports and logs in {out_dir}", flush=True)
    head = f"{'system':30s} {'load':>7s} {'req/s':>7s}"
    for name in ("TTFT", "outside", "in", "intake", "->first"):
        head += f" {name + ' mean':>8s} {'p50':>8s}"
    head += f" {'engine':>8s} {'plane':>8s} {'ITL50':>6s}"
    print(head, flush=True)
    runs = svd.alternating_rounds(args, systems, loads, partial(run_point, args), line, out_dir)
    print("\nround by round (Tandem - Dynamo, ms; mean / p50 of each part)")
    for ts, ds in tandem_dynamo_pairs(systems):
        for load in loads:
            cells = []
            for key in ("ttft", "outside", "in", "intake", "->first"):
                for stat in ("mean", "p50"):
                    d = [
                        parts(a, stat)[key] - parts(b, stat)[key]
                        for a, b in zip(runs[(ts, load)], runs[(ds, load)], strict=True)
                    ]
                    ahead = sum(1 for v in d if v <= 0)
                    cells.append(f"{key} {stat} {statistics.median(d):+.2f} ({ahead}/{len(d)})")
            print(f"  {load} {ts} - {ds}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

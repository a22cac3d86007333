"""How a closed loop at c=64 batches prompts: run `tandem serve` (sim engine, 2 workers, the serving
benchmark's settings, speed-up 1), drive it with the referee client, and read each worker's
prefill-step counters before and after.

    .venv/bin/python benchmarks/prefill_regime.py [--runs N] [--concurrency C] [extra `tandem serve` flags...]

Prints the client's req/s, TTFT and ITL; the engines' own share of them (means over the run: queue
time, prefill time, inter-token time, from the workers' `RequestPhases` counters) and what the
serving path added on top (client mean minus engine mean); and per worker: steps, the share that
carried a prefill, and the mean prefill batch (prompts per prefill step). See docs/benchmarks.md,
"two regimes".
Needs the Dynamo venv's Python for the referee (as serving_vs_dynamo.py) and the tok8k tokenizer
folder that serving_vs_dynamo.py makes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tandem.control.rpc_client import RpcClientPool
from tandem.protocol.registry import WorkerStats
from tandem.protocol.rpc import StatsCall

REPO = Path(__file__).resolve().parents[1]
MODEL = str(Path.home() / ".cache/tandem/bench/tok8k")
PY = str(Path.home() / ".cache/tandem/dynamo/venv/bin/python")
REFEREE = REPO.parent / "shared" / "bench" / "referee_loadgen.py"


async def _stats(addrs: list[str]) -> list[WorkerStats]:
    pool = RpcClientPool()
    try:
        out = []
        for a in addrs:
            reply = await pool.call(a, StatsCall())
            assert isinstance(reply, WorkerStats)
            out.append(reply)
        return out
    finally:
        await pool.close()


def run_once(extra: list[str], concurrency: int = 64, port: int = 8791) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="prefill-regime-"))
    log_path = tmp / "serve.log"
    log = open(log_path, "w")
    cmd = [str(REPO / ".venv/bin/tandem"), "--log-level", "WARNING", "serve", "--model", MODEL]
    cmd += ["--served-model-name", "tiny"]
    cmd += ["--engine", "sim", "--workers", "2", "--port", str(port), "--speedup", "1"]
    cmd += ["--router", "round-robin", "--block-size", "64", "--num-blocks", "16384"]
    cmd += ["--max-num-seqs", "256", "--max-num-batched-tokens", "8192", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            time.sleep(0.5)
            if "Tandem ready" in log_path.read_text():
                break
        addrs = re.findall(r"ready on (\S+)", log_path.read_text())
        before = asyncio.run(_stats(addrs))
        client = [PY, str(REFEREE), "--url", f"http://127.0.0.1:{port}", "--model", "tiny"]
        n = 60 * concurrency
        client += ["--tokenizer", MODEL, "--concurrency", str(concurrency), "--requests", str(n)]
        client += ["--warmup", str(4 * concurrency)]
        client += ["--isl", "100", "--osl", "50"]
        subprocess.run([*client, "--out", str(tmp / "client.json")], check=True, capture_output=True)
        after = asyncio.run(_stats(addrs))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    r = json.loads((tmp / "client.json").read_text())
    ttft, itl = r["ttft_ms"], r["itl_ms"]
    print(
        f"req/s {r['req_per_s']:.1f}  TTFT p50/p99 {ttft['p50']:.1f}/{ttft['p99']:.1f} ms  "
        f"ITL p50/p99 {itl['p50']:.2f}/{itl['p99']:.2f} ms"
    )

    def delta(field: str) -> float:
        return sum(getattr(a, field) - getattr(b, field) for b, a in zip(before, after, strict=True))

    queue, queued = delta("queue_seconds_total"), delta("queued_requests_total")
    prefill, firsts = delta("prefill_seconds_total"), delta("first_tokens_total")
    decode, tokens = delta("decode_seconds_total"), delta("decode_tokens_total")
    if queued and firsts and tokens:
        e_queue, e_prefill, e_itl = 1000 * queue / queued, 1000 * prefill / firsts, 1000 * decode / tokens
        print(
            f"  engines (means): queue {e_queue:.2f} ms + prefill {e_prefill:.2f} ms = TTFT "
            f"{e_queue + e_prefill:.2f} ms, ITL {e_itl:.3f} ms; added by the serving path: "
            f"TTFT {ttft['mean'] - e_queue - e_prefill:+.2f} ms, ITL {itl['mean'] - e_itl:+.3f} ms"
        )
    for b, a in zip(before, after, strict=True):
        steps = a.num_steps - b.num_steps
        busy = ""
        if r.get("duration_s"):
            busy = f", ~{1000 * r['duration_s'] / max(steps, 1):.2f} ms a step (steps incl. warm-up)"
        ps = a.prefill_steps - b.prefill_steps
        prompts = a.prefill_requests_total - b.prefill_requests_total
        print(
            f"  {a.worker_id}: {steps} steps, {ps} with a prefill ({ps / max(steps, 1):.1%}), "
            f"{prompts} prompts, mean prefill batch {prompts / max(ps, 1):.2f}{busy}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=64)
    args, serve_flags = ap.parse_known_args()  # everything else goes to `tandem serve`
    for _ in range(args.runs):
        run_once(serve_flags, args.concurrency)


if __name__ == "__main__":
    main()

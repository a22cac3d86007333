"""A worker's own CPU per output token: one `tandem worker` (simulated engine, speed-up 10000, so
engine time is negligible) driven over the request plane by a client in this process, with no
frontend. Each row is a concurrency: the same number of requests (100 prompt tokens, 50 out) run
with that many streams at once; a round runs every row, and the table gives medians over rounds.

    .venv/bin/python benchmarks/worker_overhead.py                     # c = 1, 8, 32; 5 rounds
    .venv/bin/python benchmarks/worker_overhead.py --concurrency 32 --profile /tmp/w.txt

`--profile` records the worker with py-spy (if installed) during the last round of the last row,
as raw folded stacks, and prints the functions with the most samples.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve_proc import cpu_seconds  # noqa: E402

from tandem.control.rpc_client import RpcClientPool  # noqa: E402
from tandem.protocol.messages import GenerateRequest, SamplingSpec  # noqa: E402
from tandem.protocol.rpc import GenerateCall  # noqa: E402

ENGINE = ["--block-size", "64", "--num-blocks", "16384", "--max-num-seqs", "256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(address: str, concurrency: int, requests: int, tag: str) -> int:
    """Run `requests` requests, `concurrency` at a time; the output tokens received."""
    pool = RpcClientPool()
    ids = iter(range(requests))
    received = 0

    async def client() -> None:
        nonlocal received
        for i in ids:
            prompt = [(i * 7 + k) % 900 + 1 for k in range(100)]
            sampling = SamplingSpec(max_tokens=50, ignore_eos=True, temperature=0.0)
            call = GenerateCall(GenerateRequest(f"{tag}-{i}", "simmodel", prompt, sampling))
            async for out in await pool.open(address, call):
                received += len(out.new_token_ids)

    await asyncio.gather(*[client() for _ in range(concurrency)])
    await pool.close()
    return received


def start_worker(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [str(REPO / ".venv/bin/tandem"), "--log-level", "WARNING", "worker", "--model", str(model_dir)]
    cmd += ["--engine", "sim", "--speedup", "10000", "--port", str(port), *ENGINE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, address
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the worker did not start listening within 30 s")


def py_spy() -> str | None:
    """py-spy on PATH or beside this Python (a venv's bin/)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def measure(model_dir: Path, c: int, requests: int, profile: str | None) -> tuple[float, float]:
    """(worker CPU microseconds per output token, output tokens per second) for one point."""
    proc, address = start_worker(model_dir)
    try:
        asyncio.run(drive(address, 8, 200, "warm"))
        spy = None
        if profile:
            spy_cmd = [str(py_spy()), "record", "-p", str(proc.pid), "-o", profile, "-f", "raw", "-r", "200"]
            spy = subprocess.Popen([*spy_cmd, "--nonblocking", "--threads"], stdout=subprocess.DEVNULL)
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        tokens = asyncio.run(drive(address, c, requests, "run"))
        cpu1, t1 = cpu_seconds(proc.pid), time.perf_counter()
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            spy.wait(timeout=30)
        return (cpu1 - cpu0) / tokens * 1e6, tokens / (t1 - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def top_functions(path: str, n: int = 15) -> str:
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return "\n".join(f"{k / max(total, 1):6.1%}  {f}" for f, k in own.most_common(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated streams at once")
    ap.add_argument("--requests", type=int, default=4000, help="requests per point")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", help="py-spy raw output for the last point")
    args = ap.parse_args()
    if args.profile and py_spy() is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    cs = [int(c) for c in args.concurrency.split(",")]
    results: dict[int, list[tuple[float, float]]] = {c: [] for c in cs}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "simmodel"
        model_dir.mkdir()
        config = {"max_position_embeddings": 2048, "vocab_size": 1000}
        (model_dir / "config.json").write_text(json.dumps(config))
        for r in range(args.rounds):
            for c in cs:
                last = r == args.rounds - 1 and c == cs[-1]
                us, rate = measure(model_dir, c, args.requests, args.profile if last else None)
                results[c].append((us, rate))
                line = f"round {r + 1}  c={c:<3d} worker CPU {us:6.2f} us/token  {rate:9.0f} tok/s"
                print(line, flush=True)
    print(f"\nmedians over {args.rounds} rounds, {args.requests} requests of 100 + 50 tokens per point")
    print(f"{'c':>4s}{'worker us/token':>17s}{'tok/s':>10s}{'range us/token':>18s}")
    for c, rows in results.items():
        us = [u for u, _ in rows]
        rate = statistics.median(t for _, t in rows)
        print(f"{c:4d}{statistics.median(us):17.2f}{rate:10.0f}{min(us):9.2f}..{max(us):.2f}")
    if args.profile:
        print(f"\nworker functions by own samples (py-spy, c={cs[-1]}; raw stacks in {args.profile}):")
        print(top_functions(args.profile))


if __name__ == "__main__":
    main()

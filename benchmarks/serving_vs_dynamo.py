"""Serving overhead, Tandem vs NVIDIA Dynamo 1.6.1, same workload, same run, same client.

    timeout 3600 .venv/bin/python benchmarks/serving_vs_dynamo.py --dynamo ~/.cache/tandem/dynamo \
        --speedups 1,10000 --concurrency 1,16,64 --out runs/serving_vs_dynamo.json

Workload (the "Serving path" issue): chat requests of 100 random tokens, 50 output tokens (ignore_eos),
one token per SSE chunk, 2 workers, everything on 127.0.0.1. Tandem's simulated engine and Dynamo's
mocker share the timing model (Dynamo's polynomials) and the engine settings: block size 64, 16,384
blocks, 256 sequences, 8,192 batched tokens. Systems, started one after the other:

    tandem-rr / tandem-ll   `tandem serve --engine sim --workers 2` with round-robin / least-loaded
    dynamo / dynamo-nodelay  `dynamo.mocker --num-workers 2` + `dynamo.frontend`, stock, and with
                             TCP_NODELAY forced by LD_PRELOAD=nodelay.so (../shared/bench/nodelay_shim.c);
                             a suffix `@MODE` (e.g. `dynamo-nodelay@least-loaded`) picks Dynamo's
                             `--router-mode` for that row (default `--dynamo-router`)

A `#TAG` suffix runs a row's system again as its own row (`dynamo-nodelay@least-loaded#aa`): a tagged
Dynamo row is compared with the untagged Dynamo rows like a Tandem row is, so the paired table shows
what one system measures against itself on this machine (an A/A noise floor).

Each point runs the referee client (../shared/bench/referee_loadgen.py, with the CPU of every server
process) after `wait_quiet.py`; `--tandem-bench` also runs `tandem bench` on the same point. Dynamo
needs a venv as in ../shared/bench/dynamo-cpu.md (`--dynamo DIR` holds venv/ and nodelay.so).
Prints one side-by-side table; `--out` keeps every raw result. `--pool` also keeps every request's
TTFT and ITL (benchmarks/referee_raw.py: the same referee) and compares the percentiles of all rounds'
requests taken together, a p99 over several thousand requests rather than the median of per-round p99s,
each difference with its 90% interval when whole rounds are drawn again (rounds, not requests, are the
independent draws: a fresh deployment keeps the batching regime it falls into for the round).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

try:  # run as a script (benchmarks/ is on sys.path), or imported as benchmarks.* (the tests)
    from serving_report import median_result, paired, point_key, pooled, summary, table
except ImportError:
    from benchmarks.serving_report import median_result, paired, point_key, pooled, summary, table

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "bench"
ENGINE = {"block_size": 64, "num_blocks": 16384, "max_num_seqs": 256, "max_num_batched_tokens": 8192}
# (speedup, concurrency) -> (measured requests, warmup): ~15 s to ~45 s per point (c=1: enough
# requests for a p99 that is not just the slowest one).
COUNTS = {1: {1: (150, 4), 16: (320, 32), 64: (1280, 128)}}
STRESS_COUNTS = {1: (1500, 100), 16: (4000, 200), 64: (6000, 300)}
TANDEM_SYSTEMS = {"tandem-rr": "round-robin", "tandem-ll": "least-loaded", "tandem-kv": "kv"}
"""Tandem rows by name -> the router policy they run. Suffixes set worker flags, so variants share a
run: `:dF` `--scheduler-delay-factor F` (e.g. `tandem-rr:d0.5`), `:rN` `--regroup-steps N`, `:wN`
`--regroup-window-steps N` (e.g. `tandem-ll:r2:w6`), `:eN` `--regroup-expect-steps N`, `:pN`
`--regroup-pace-steps N`, `:fN` `--frontends N` (e.g. `tandem-ll:f2`); `:tN` sets
TANDEM_TOKENIZE_BATCH_CHARS=N, `:gN` TANDEM_WORKER_SWITCH_INTERVAL_MS=N and `:kN` TANDEM_TIKTOKEN=N for
the row."""
VARIANT_FLAGS = {
    "d": "--scheduler-delay-factor",
    "r": "--regroup-steps",
    "w": "--regroup-window-steps",
    "e": "--regroup-expect-steps",
    "p": "--regroup-pace-steps",
    "f": "--frontends",
}
VARIANT_ENV = {
    "t": "TANDEM_TOKENIZE_BATCH_CHARS",
    "g": "TANDEM_WORKER_SWITCH_INTERVAL_MS",
    "k": "TANDEM_TIKTOKEN",
}
SLOW_STOCK_C1 = 5  # stock Dynamo waits ~40 ms per chunk on Nagle at c=1: fewer requests, same shape


def twin_of(system: str) -> str:
    """The system a row runs: its name without a `#TAG` suffix."""
    return system.partition("#")[0]


def counts(speedup: float, c: int, system: str) -> tuple[int, int]:
    n, warm = COUNTS.get(int(speedup), STRESS_COUNTS).get(c, (c * 40, c * 2))
    if twin_of(system).partition("@")[0] == "dynamo" and c == 1 and speedup > 1:
        n, warm = n // SLOW_STOCK_C1, warm // SLOW_STOCK_C1
    return n, warm


class Deployment:
    def __init__(self, name: str, procs: dict[str, subprocess.Popen], url: str) -> None:
        self.name, self.procs, self.url = name, procs, url

    def pids(self) -> dict[str, int]:
        """Every server process to measure: the named ones and (Tandem) the workers and other
        frontend processes they started (`<name>_child<i>`, `<name>_fe<i>`)."""
        out = {k: p.pid for k, p in self.procs.items()}
        for name, p in self.procs.items():
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            for i, pid in enumerate(kids):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                out[f"{name}_{'fe' if b'frontend' in argv else 'child'}{i}"] = int(pid)
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_tandem(args: argparse.Namespace, speedup: float, name: str, logdir: Path) -> Deployment:
    base, *variants = twin_of(name).split(":")
    router = TANDEM_SYSTEMS[base]
    cmd = [str(REPO / ".venv/bin/tandem"), "--log-level", "WARNING", "serve", "--model", args.model]
    cmd += ["--served-model-name", "tiny", "--engine", "sim", "--workers", str(args.workers)]
    cmd += ["--port", str(args.port)]
    cmd += ["--speedup", str(speedup), "--router", router]
    for k, v in ENGINE.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ)
    for v in variants:
        if v[:1] in VARIANT_ENV:
            env[VARIANT_ENV[v[0]]] = v[1:]
            continue
        if v[:1] not in VARIANT_FLAGS:
            known = sorted(VARIANT_FLAGS.keys() | VARIANT_ENV.keys())
            raise SystemExit(f"unknown variant {v!r} in {name!r} (known: {known})")
        cmd += [VARIANT_FLAGS[v[0]], v[1:]]
    tag = "-".join(variants) or "default"
    log = open(logdir / f"tandem-{router}-{tag}{name.partition('#')[2]}-{speedup:g}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Deployment(name, {"frontend": proc}, f"http://127.0.0.1:{args.port}")


def start_dynamo(args: argparse.Namespace, speedup: float, system: str, logdir: Path) -> Deployment:
    base, _, router = twin_of(system).partition("@")
    nodelay = base == "dynamo-nodelay"
    dyn = Path(args.dynamo)
    kv = Path(tempfile.mkdtemp(prefix="dynkv-"))
    env = dict(os.environ, DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(kv), DYN_REQUEST_PLANE="tcp")
    env.update(DYN_EVENT_PLANE="zmq", DYN_LOG="warn", DYN_TCP_RPC_HOST="127.0.0.1")
    env.update(DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1", DYN_EVENT_PLANE_HOST="127.0.0.1")
    env.update(DYN_SYSTEM_HOST="127.0.0.1")
    if nodelay:
        env["LD_PRELOAD"] = str(dyn / "nodelay.so")
    py = str(dyn / "venv/bin/python")
    tag = f"{'nodelay' if nodelay else 'stock'}-{router or args.dynamo_router}{system.partition('#')[2]}"
    tag += f"-{speedup:g}"
    mocker = [py, "-m", "dynamo.mocker", "--model-path", args.model, "--model-name", "tiny"]
    mocker += ["--speedup-ratio", str(speedup), "--num-workers", str(args.workers), "--block-size", "64"]
    mocker += ["--num-gpu-blocks-override", "16384", "--max-num-seqs", "256"]
    mocker += ["--max-num-batched-tokens", "8192"]
    frontend = [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(args.port)]
    frontend += ["--router-mode", router or args.dynamo_router]
    procs = {}
    for name, cmd in (("mocker", mocker), ("frontend", frontend)):
        log = open(logdir / f"dynamo-{name}-{tag}.log", "w")
        procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Deployment(system, procs, f"http://127.0.0.1:{args.port}")


def start_system(args: argparse.Namespace, speedup: float, system: str, logdir: Path) -> Deployment:
    """A system by its row name: `tandem-*` or `dynamo*` (see the module docstring)."""
    if system.startswith("tandem"):
        return start_tandem(args, speedup, system, logdir)
    return start_dynamo(args, speedup, system, logdir)


@contextmanager
def running(args: argparse.Namespace, speedup: float, system: str, logdir: Path) -> Iterator[Deployment]:
    """`start_system`, ready to serve; stopped however the body ends."""
    dep = start_system(args, speedup, system, logdir)
    try:
        wait_ready(dep)
        yield dep
    finally:
        dep.stop()


P = TypeVar("P")


def alternating_rounds(
    args: argparse.Namespace,
    systems: list[str],
    points: list[P],
    run: Callable[[Deployment, P, Path], dict[str, Any]],
    line: Callable[[str, P, dict[str, Any]], str],
    out_dir: Path,
) -> dict[tuple[str, P], list[dict[str, Any]]]:
    """`args.rounds` rounds at speed-up 1: each deploys every system in turn (in reverse every other
    round, so no system always runs first) and runs `run(deployment, point, report_path)` at every
    point, printing `line(system, point, result)`. Every point's results, round by round."""
    runs: dict[tuple[str, P], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for s in systems if rnd % 2 == 0 else systems[::-1]:
            with running(args, 1.0, s, out_dir) as dep:
                for point in points:
                    r = run(dep, point, out_dir / f"{s}-{point}-r{rnd}.json")
                    runs.setdefault((s, point), []).append(r)
                    print(line(s, point, r), flush=True)
    return runs


def wait_ready(dep: Deployment, timeout: float = 180.0) -> None:
    """Until a 2-token chat request succeeds twice (both workers registered for round-robin)."""
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()
    deadline = time.monotonic() + timeout
    ok = 0
    while ok < 4:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dep.name} not ready after {timeout:.0f} s")
        for p in dep.procs.values():
            if p.poll() is not None:
                raise RuntimeError(f"{dep.name}: a process exited with {p.returncode}")
        req = urllib.request.Request(
            dep.url + "/v1/chat/completions", body, {"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                ok += r.status == 200
        except OSError:
            ok = 0
            time.sleep(0.5)
    time.sleep(2.0)  # let discovery settle on every worker


def run_point(args: argparse.Namespace, dep: Deployment, speedup: float, c: int, out_dir: Path) -> dict:
    n, warm = counts(speedup, c, dep.name)
    n = max(1, round(n * args.count_scale))
    subprocess.run([sys.executable, str(SHARED / "wait_quiet.py"), "15", "20"], check=False)
    pids = ",".join(f"{k}={v}" for k, v in dep.pids().items())
    out = out_dir / f"{dep.name}-{speedup:g}-c{c}.json"
    raw = out.with_suffix(".raw.json")
    # --pool: the same referee, also writing each request's TTFT and ITL
    client = (
        [str(REPO / "benchmarks/referee_raw.py"), str(raw)]
        if args.pool
        else [str(SHARED / "referee_loadgen.py")]
    )
    cmd = [args.client_python, *client, "--url", dep.url, "--model", "tiny"]
    cmd += ["--tokenizer", args.model, "--concurrency", str(c), "--requests", str(n), "--warmup", str(warm)]
    cmd += ["--isl", "100", "--osl", "50", "--pids", pids, "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
    res = json.loads(out.read_text())
    if args.pool:
        res["raw"] = json.loads(raw.read_text())
    if args.tandem_bench:
        tb = out_dir / f"{dep.name}-{speedup:g}-c{c}-tandem-bench.json"
        cmd = [str(REPO / ".venv/bin/tandem"), "bench", "--url", dep.url, "--model", "tiny", "--chat"]
        cmd += ["--tokenizer", args.model, "--concurrency", str(c), "--requests", str(n)]
        cmd += ["--warmup", str(warm), "--out", str(tb)]
        subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
        res["tandem_bench"] = json.loads(tb.read_text())
    print(f"  {dep.name:15s} x{speedup:<6g} c={c:<3d} {summary(res)}", flush=True)
    return res


def add_install_args(ap: argparse.ArgumentParser) -> None:
    """--model (the tokenizer and config folder both systems serve) and --dynamo (its install)."""
    ap.add_argument(
        "--model", default=str(Path.home() / ".cache/tandem/bench/tok8k"), help="tokenizer+config dir"
    )
    ap.add_argument("--dynamo", default=str(Path.home() / ".cache/tandem/dynamo"), help="venv/ + nodelay.so")


def add_deployment_args(ap: argparse.ArgumentParser, dynamo_router: str = "round-robin") -> None:
    """--port, --workers and --dynamo-router: where each system serves, and how."""
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workers", type=int, default=2, help="workers per system (the issue's workload: 2)")
    ap.add_argument("--dynamo-router", default=dynamo_router)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_install_args(ap)
    add_deployment_args(ap)
    ap.add_argument(
        "--client-python", default=None, help="python with aiohttp+tokenizers (default: Dynamo's)"
    )
    ap.add_argument("--systems", default="tandem-rr,tandem-ll,dynamo,dynamo-nodelay")
    ap.add_argument("--speedups", default="1,10000")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--tandem-bench", action="store_true", help="also run `tandem bench` on each point")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every system this many times, alternating; the table shows each field's median, "
        "and (speed-up 1) each Tandem row minus the Dynamo row of the same round",
    )
    ap.add_argument("--count-scale", type=float, default=1.0, help="multiply the requests per point")
    ap.add_argument(
        "--pool",
        action="store_true",
        help="keep every request's TTFT and ITL (benchmarks/referee_raw.py) and also compare the "
        "percentiles of all rounds' requests pooled",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.client_python = args.client_python or str(Path(args.dynamo) / "venv/bin/python")
    if not (Path(args.model) / "config.json").is_file():
        # The mocker samples ids from an 8k range: a 512-token vocabulary would decode them to nothing.
        maker = str(SHARED / "make_tokenizer_dir.py")
        subprocess.run([args.client_python, maker, args.model], check=True)
    systems = args.systems.split(",")
    speedups = [float(s) for s in args.speedups.split(",")]
    cs = [int(c) for c in args.concurrency.split(",")]
    out_dir = Path(tempfile.mkdtemp(prefix="serving-vs-dynamo-"))
    print(f"raw results and logs in {out_dir}", flush=True)
    runs: dict[str, list[Any]] = {}
    raws: dict[str, list[Any]] = {}
    for sp in speedups:
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]  # neither side always runs first
            for s in order:
                with running(args, sp, s, out_dir) as dep:
                    for c in cs:
                        res = run_point(args, dep, sp, c, out_dir)
                        if "raw" in res:
                            raws.setdefault(point_key(s, sp, c), []).append(res.pop("raw"))
                        runs.setdefault(point_key(s, sp, c), []).append(res)
    results = {k: median_result(v) for k, v in runs.items()}
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds per point")
    print(table(results, systems, speedups, cs))
    if args.rounds > 1 and 1.0 in speedups:
        print(paired(runs, systems, cs))
    if raws:
        print(pooled(raws, systems, speedups, cs))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"median": results, "runs": runs, "raw": raws}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

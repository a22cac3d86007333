"""Where c=1's ITL tail comes from: every token's arrival, Tandem vs Dynamo 1.6.1, same run.

    .venv/bin/python benchmarks/c1_tails.py --requests 900 --rounds 2

At c=1 a request's ITL (aiperf's: first to last token over n-1) is the step time plus whatever the
stream lost on the way, and ITL p99 over 900 requests is decided by the nine unluckiest. This keeps
every content chunk's arrival (raw HTTP on one keep-alive connection, so the client adds nothing),
lines each stream up against the median gap (one engine step) and sorts every token that came more
than `--late-ms` late into:

- **engine-like**: the stream never made the time up (net loss over that gap and the next three
  > 2 ms): the step loop itself was held up, and only the one step queued before the stall ran;
- **delivery-like**: the tokens after it came at once, so the engine kept its pace and only the
  way to the client (worker loop, frontend, client) was late;
- **last**: the last token was late (nothing after it can catch up).

Same settings as `serving_vs_dynamo.py`'s c=1 point (2 workers, speed-up 1, least-loaded, the shared
timing model); systems alternate round by round. `perf sched` over such runs (docs/benchmarks.md,
session 27) showed what the late windows hold on this VM: mostly both vCPUs idle while a timer
wake-up ran 10-20 ms late, in both systems.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tandem.bench.report import percentile

try:  # run as a script (benchmarks/ is on sys.path), or imported as benchmarks.* (the tests)
    from serving_vs_dynamo import Deployment, add_deployment_args, add_install_args, alternating_rounds
except ImportError:
    from benchmarks.serving_vs_dynamo import (
        Deployment,
        add_deployment_args,
        add_install_args,
        alternating_rounds,
    )

CAUGHT_UP_MS = 2.0
"""A late token whose stream lost more than this over it and the next three gaps was engine-like."""
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta")


@dataclass
class Tails:
    """One system's streams, lined up against its median gap."""

    step_ms: float
    ttft_ms: list[float]
    itl_ms: list[float]
    excess_ms: list[float]
    """Per request: first-to-last token time minus (n-1) median gaps."""
    engine: list[float] = field(default_factory=list)
    """Engine-like late tokens: the ms each stream lost over it (and the next three gaps)."""
    delivery: list[float] = field(default_factory=list)
    """Delivery-like late tokens: how late each was."""
    last: list[float] = field(default_factory=list)
    """Late last tokens: how late."""
    last_gap_ms: float = 0.0
    """Median of the last gap minus the median gap: what closing a stream adds to its last token."""


def tails(streams: list[list[float]], late_ms: float) -> Tails:
    """`streams`: per request, the time it was sent and then each content chunk's arrival (s)."""
    gaps = [[(b - a) * 1e3 for a, b in itertools.pairwise(t[1:])] for t in streams if len(t) > 3]
    step = statistics.median(g for gs in gaps for g in gs)
    out = Tails(
        step_ms=step,
        ttft_ms=[(t[1] - t[0]) * 1e3 for t in streams if len(t) > 1],
        itl_ms=[sum(gs) / len(gs) for gs in gaps],
        excess_ms=[sum(gs) - step * len(gs) for gs in gaps],
        last_gap_ms=statistics.median(gs[-1] for gs in gaps) - step,
    )
    for gs in gaps:
        dev = [g - step for g in gs]
        k = 0
        while k < len(dev):
            if dev[k] <= late_ms:
                k += 1
            elif k == len(dev) - 1:
                out.last.append(dev[k])
                k += 1
            else:
                net = sum(dev[k : k + 4])
                if net > CAUGHT_UP_MS:
                    out.engine.append(net)
                else:
                    out.delivery.append(dev[k])
                k += 4
    return out


def request_bytes(seq: int) -> bytes:
    rng = random.Random(seq)
    text = f"{seq} " + " ".join(rng.choice(WORDS) for _ in range(90))
    message = {"role": "user", "content": text}
    body = json.dumps(
        {"model": "tiny", "messages": [message], "max_tokens": 50, "stream": True, "ignore_eos": True}
    ).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def stream_times(sock: socket.socket, seq: int) -> list[float]:
    """Send one streaming request on the open connection: the time it was sent, then each content
    chunk's arrival time.

    Events split across reads count when their marker is complete: the count of content markers in
    everything read so far, compared before and after each read."""
    request = request_bytes(seq)
    times = [time.perf_counter()]
    sock.sendall(request)
    buf = b""
    while not (b"[DONE]" in buf and buf.endswith(b"0\r\n\r\n")):  # the chunked body's end
        data = sock.recv(1 << 16)
        now = time.perf_counter()
        if not data:
            raise ConnectionError("the server closed the connection mid-stream")
        buf += data
        times += [now] * (buf.count(b'"content":"') - len(times) + 1)
    return times


def measure(dep: Deployment, requests: int, warmup: int, seq0: int) -> list[list[float]]:
    port = int(dep.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(warmup):
            stream_times(sock, seq0 - 1 - i)
        return [stream_times(sock, seq0 + i) for i in range(requests)]
    finally:
        sock.close()


def row(system: str, t: Tails, n: int) -> str:
    per_k = 1000 / n
    ttft, itl = t.ttft_ms, t.itl_ms  # never empty: every measured stream has tokens
    eng = f"{len(t.engine) * per_k:5.1f} ({statistics.mean(t.engine) if t.engine else 0:4.1f} ms)"
    return (
        f"{system:32s} {percentile(ttft, 50):6.2f} {percentile(ttft, 99):6.2f} {t.step_ms:6.3f} "
        f"{percentile(itl, 50):7.3f} {percentile(itl, 99):7.3f} "
        f"{sum(e > 3 for e in t.excess_ms) * per_k:6.1f} {eng:>14s} {len(t.delivery) * per_k:9.1f} "
        f"{len(t.last) * per_k:6.1f} {t.last_gap_ms:+8.3f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_install_args(ap)
    ap.add_argument("--systems", default="tandem-ll,dynamo-nodelay@least-loaded")
    ap.add_argument("--requests", type=int, default=900, help="measured requests per system and round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--late-ms", type=float, default=3.0, help="a token this much over one step is late")
    add_deployment_args(ap, dynamo_router="least-loaded")
    args = ap.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="c1-tails-"))
    print(f"logs in {out_dir}", flush=True)
    systems = args.systems.split(",")
    seqs = iter(range(10_000, 10_000_000, 10_000))

    def run(dep: Deployment, _point: int, _path: Path) -> dict[str, list[list[float]]]:
        return {"streams": measure(dep, args.requests, args.warmup, next(seqs))}

    def line(system: str, _point: int, r: dict[str, list[list[float]]]) -> str:
        return row(system, tails(r["streams"], args.late_ms), args.requests)

    head = "TTFT50 TTFT99   step ITL p50 ITL p99 >3ms/k  engine-like/k deliver/k last/k last gap"
    print(f"{'system':32s} {head}")
    runs = alternating_rounds(args, systems, [1], run, line, out_dir)
    print(f"\nall {args.rounds} rounds pooled (per 1,000 requests; ms)")
    for system in systems:
        pooled = [s for r in runs[(system, 1)] for s in r["streams"]]
        print(row(system, tails(pooled, args.late_ms), len(pooled)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

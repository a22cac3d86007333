"""How requests that arrive close together meet one simulated worker: Tandem vs Dynamo 1.6.1.

    .venv/bin/python benchmarks/arrival_probe.py [--systems tandem,dynamo] [--gaps 0,0.5,1,2,4,8]

One worker (`tandem serve --engine sim --workers 1` / `dynamo.mocker --num-workers 1` behind
`dynamo.frontend`, TCP_NODELAY, speed-up 1, the serving benchmark's engine settings), chat requests of
~70 prompt tokens, raw HTTP on pre-opened connections so the client adds nothing between sends.

- **gap**: two requests sent g ms apart to the idle worker. If both reach the engine before its
  step starts they share one prefill step and their first tokens come at the same instant;
  otherwise the second waits for the first's step (about one more prefill).
  Reported: median TTFT of each, and how many of 10 pairs shared a step.
- **after**: request B sent the moment request A's stream ends. B's TTFT equals an idle worker's
  if the worker is idle once it has sent A's last token.

This is what decides whether a burst of replacement requests (a closed loop's cohort finishing at
once) is prefilled in one step or split over several (`docs/benchmarks.md`, "Serving overhead").
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import serving_vs_dynamo as svd

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
PAIRS = 10


def request_bytes(seq: int, max_tokens: int = 3) -> bytes:
    rng = random.Random(seq)
    text = f"{seq} " + " ".join(rng.choice(WORDS) for _ in range(60))
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    data = json.dumps({**body, "stream": True}).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_stream(sock: socket.socket) -> float:
    """Read one SSE response to [DONE]; the time its first content chunk arrived."""
    buf = b""
    first = 0.0
    while True:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
        if not first and b'"content":"' in buf.split(b"\r\n\r\n", 1)[-1]:
            first = time.perf_counter()
        if b"[DONE]" in buf:
            break
    return first or time.perf_counter()


def pair(port: int, gap_ms: float, seq: int) -> tuple[float, float]:
    socks = [connect(port), connect(port)]
    reqs = [request_bytes(seq), request_bytes(seq + 1)]
    firsts = [0.0, 0.0]
    sent = [0.0, 0.0]
    readers = []
    t0 = time.perf_counter()
    for k in range(2):
        while time.perf_counter() < t0 + k * gap_ms / 1000:
            pass  # busy-wait: sleep's resolution is coarser than the gaps probed
        sent[k] = time.perf_counter()
        socks[k].sendall(reqs[k])

        def read(k: int = k) -> None:
            firsts[k] = read_stream(socks[k])

        readers.append(threading.Thread(target=read))
        readers[-1].start()
    for r in readers:
        r.join(10)
    for s in socks:
        s.close()
    return (firsts[0] - sent[0]) * 1e3, (firsts[1] - sent[1]) * 1e3


def after(port: int, seq: int, a_tokens: int) -> float:
    a, b = connect(port), connect(port)
    a.sendall(request_bytes(seq, a_tokens))
    read_stream(a)
    sent = time.perf_counter()
    b.sendall(request_bytes(seq + 1))
    first = read_stream(b)
    a.close()
    b.close()
    return (first - sent) * 1e3


def probe(system: str, args: argparse.Namespace) -> None:
    ns = argparse.Namespace(
        model=args.model, port=args.port, workers=1, dynamo=args.dynamo, dynamo_router="round-robin"
    )
    logdir = Path(tempfile.mkdtemp(prefix="arrival-probe-"))
    row = "tandem-rr" if system == "tandem" else "dynamo-nodelay@round-robin"  # one worker: routing is moot
    seq = 1000
    with svd.running(ns, 1.0, row, logdir):
        for gap in args.gaps:
            firsts, seconds, shared = [], [], 0
            for _ in range(PAIRS):
                time.sleep(0.15)
                seq += 2
                a, b = pair(args.port, gap, seq)
                firsts.append(a)
                seconds.append(b)
                shared += b + gap < a + 8  # the second's first token came with the first's
            print(
                f"| {system} | gap {gap:g} ms | {statistics.median(firsts):.1f} | "
                f"{statistics.median(seconds):.1f} | {shared}/{PAIRS} |",
                flush=True,
            )
        for a_tokens in (3, 10):
            ttft = []
            for _ in range(PAIRS):
                time.sleep(0.15)
                seq += 2
                ttft.append(after(args.port, seq, a_tokens))
            print(f"| {system} | after a {a_tokens}-token request | | {statistics.median(ttft):.1f} | |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    svd.add_install_args(ap)
    ap.add_argument("--systems", default="tandem,dynamo")
    ap.add_argument("--gaps", default="0,0.5,1,2,4,8", type=lambda s: [float(g) for g in s.split(",")])
    ap.add_argument("--port", type=int, default=8751)
    args = ap.parse_args()
    print("| system | probe | first TTFT ms | second TTFT ms | shared a step |")
    print("| --- | --- | --- | --- | --- |")
    for system in args.systems.split(","):
        probe(system, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

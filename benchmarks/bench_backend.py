"""The HTTP router's own work per request at fleet scale, before it contacts a worker.

    .venv/bin/python benchmarks/bench_backend.py [--workers 1000] [--requests 300]

`RouterBackend` (what `tandem serve` routes with) per request: read the live workers from
discovery and keep the model's candidates, build each candidate's load view, let a stateful policy
follow the worker set, and pick. Measured here piece by piece over an embedded registry holding
`--workers` workers (fake addresses: nothing is sent), with 8,192-token prompts (512 blocks of 16).
`kv-approx` is the KV policy without events (no connections needed); its pick includes hashing the
prompt and indexing the predicted blocks, on top of the decision `bench_indexer.py` measures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from tandem.control.discovery import MemoryDiscovery
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.protocol.registry import WorkerInfo
from tandem.router.backend import RouterBackend

POLICIES = ("round-robin", "least-loaded", "kv-approx")


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs) * 1e3:.3f} / {xs[int(len(xs) * 0.99)] * 1e3:.3f}"


async def main(workers: int, requests: int) -> None:
    d = MemoryDiscovery()
    for i in range(workers):
        info = WorkerInfo(f"w{i:04d}", f"127.0.0.1:{20000 + i}", "m", "/m", block_size=16, num_blocks=2048)
        await d.grant(info, 600)
    rng = random.Random(0)
    print(f"{workers} workers, {requests} requests per policy; p50 / p99 ms")
    print("| policy | candidates | views | sync | pick | total |\n|---|---|---|---|---|---|")
    for name in POLICIES:
        b = RouterBackend(d, name)
        parts: list[list[float]] = [[], [], [], [], []]
        for k in range(requests):
            prompt = [rng.randrange(30000) for _ in range(8192)]
            req = GenerateRequest(f"r{k}", "m", prompt, SamplingSpec(max_tokens=16))
            t0 = time.perf_counter()
            cands = b._decode_candidates("m")
            t1 = time.perf_counter()
            views = b._views(cands)
            t2 = time.perf_counter()
            if b._sync is not None:
                b._sync(b._last_live)
            t3 = time.perf_counter()
            chosen = b.policy.pick(req, views)
            t4 = time.perf_counter()
            assert any(w.worker_id == chosen for w in cands)
            if b._on_finish is not None:
                b._on_finish(req.request_id)
            for p, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                p.append(dt)
        print(f"| {name} | " + " | ".join(ms(p) for p in parts) + " |", flush=True)
        await b.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=300)
    a = ap.parse_args()
    asyncio.run(main(a.workers, a.requests))

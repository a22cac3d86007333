"""KV indexer and router at data-centre scale: decision time and memory with 1,000 workers indexed.

Each worker caches `--blocks-per-worker` blocks: a system prompt shared by every worker, a few
conversation prefixes shared by a group of workers, and private blocks. The query is an 8k-token
prompt (block size 16 -> 512 blocks) whose prefix is held whole by some workers and partly by others.

    .venv/bin/python benchmarks/bench_indexer.py --workers 1000

Two timings: `find_matches` alone, and the whole routing decision (`KvRouter.route`: hash lookup,
policy over all 1,000 candidates, load bookkeeping) for the same prompts (block hashes given).
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc

from tandem.kvcache.hashing import block_hashes
from tandem.protocol.kv_events import BlockStored
from tandem.router.indexer import KvIndexer
from tandem.router.kv import KvRouter, KvRouterConfig
from tandem.router.kv_policy import TUNED
from tandem.router.policy import WorkerLoad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--blocks-per-worker", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    rng = random.Random(0)
    bs = args.block_size
    system = [rng.randrange(50000) for _ in range(bs * 64)]
    convs = [system + [rng.randrange(50000) for _ in range(args.prompt_tokens)] for _ in range(16)]
    conv_hashes = [block_hashes(c, bs) for c in convs]

    tracemalloc.start()
    idx = KvIndexer()
    t0 = time.perf_counter()
    n_events = 0
    for w in range(args.workers):
        wid = f"w{w}"
        conv = conv_hashes[w % len(conv_hashes)]
        keep = rng.randrange(64, len(conv))  # this worker holds a random-length prefix of its group's chat
        held = conv[:keep]
        private = block_hashes(
            [rng.randrange(50000) for _ in range(bs * (args.blocks_per_worker - keep))], bs
        )
        idx.apply_events(wid, [BlockStored(0, held, None, bs), BlockStored(1, private, None, bs)])
        n_events += len(held) + len(private)
    build_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    times = []
    for q in range(args.queries):
        query = conv_hashes[q % len(conv_hashes)][: args.prompt_tokens // bs]
        t = time.perf_counter()
        matches = idx.find_matches(query)
        times.append(time.perf_counter() - t)
    times.sort()
    p = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3  # noqa: E731

    router = KvRouter(KvRouterConfig(block_size=bs, policy=TUNED))
    router.indexer = idx  # the index built above
    candidates = [WorkerLoad(f"w{w}", capacity_blocks=args.blocks_per_worker) for w in range(args.workers)]
    n_blocks = args.prompt_tokens // bs
    for q in range(args.queries):
        query = conv_hashes[q % len(conv_hashes)][:n_blocks]
        router.route(f"q{q}", query, args.prompt_tokens, candidates)
        if q % 4:
            router.finish(f"q{q}")  # keep some load in flight, as in serving
    decide = router.metrics
    print(
        f"| workers | blocks indexed (entries) | build (block events/s) | peak MiB | bytes/entry "
        f"| find_matches p50 / p99 ms ({args.prompt_tokens // bs} blocks) | workers matched "
        f"| route (index + policy) p50 / p99 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.workers} | {idx.num_blocks:,} ({idx.num_entries:,}) | {n_events / build_s:,.0f} "
        f"| {peak / 2**20:,.0f} | {peak / max(idx.num_entries, 1):.0f} | {p(0.5):.3f} / {p(0.99):.3f} "
        f"| {len(matches)} | {decide.percentile_ms(0.5):.3f} / {decide.percentile_ms(0.99):.3f} |"
    )


if __name__ == "__main__":
    main()

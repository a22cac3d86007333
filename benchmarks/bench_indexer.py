"""KV indexer and router at data-centre scale: decision time and memory with 1,000 workers indexed.

Each worker caches `--blocks-per-worker` blocks: a system prompt shared by every worker, a few
conversation prefixes shared by a group of workers, and private blocks. The query is an 8k-token
prompt (block size 16 -> 512 blocks) whose prefix is held whole by some workers and partly by others.

    .venv/bin/python benchmarks/bench_indexer.py --workers 1000

Three timings: the index walk alone (`KvIndexer.match`), the routing decision (`KvRouter.route`:
index walk, policy over all 1,000 candidates, load bookkeeping) with the block hashes given, and
the decision as the frontend makes it from the prompt's token ids (hashing the blocks + route).
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc

from tandem.kvcache.hashing import block_hashes
from tandem.protocol.kv_events import BlockStored
from tandem.router.kv import KvRouter, KvRouterConfig
from tandem.router.kv_policy import TUNED
from tandem.router.policy import WorkerLoad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--blocks-per-worker", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    rng = random.Random(0)
    bs = args.block_size
    system = [rng.randrange(50000) for _ in range(bs * 64)]
    convs = [system + [rng.randrange(50000) for _ in range(args.prompt_tokens)] for _ in range(16)]
    conv_hashes = [block_hashes(c, bs) for c in convs]

    router = KvRouter(KvRouterConfig(block_size=bs, policy=TUNED))
    idx = router.indexer
    tracemalloc.start()
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

    def pct(xs: list[float], f: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(f * len(xs)))] * 1e3

    n_blocks = args.prompt_tokens // bs
    walk = []
    for q in range(args.queries):
        query = conv_hashes[q % len(conv_hashes)][:n_blocks]
        t = time.perf_counter()
        groups = idx.match(query)
        walk.append(time.perf_counter() - t)

    # The whole decision as the frontend makes it: hash the prompt's tokens, then route.
    candidates = [WorkerLoad(f"w{w}", capacity_blocks=args.blocks_per_worker) for w in range(args.workers)]
    decide = []
    for q in range(args.queries):
        tokens = convs[q % len(convs)][: args.prompt_tokens]
        t = time.perf_counter()
        router.route(f"q{q}", block_hashes(tokens, bs), args.prompt_tokens, candidates)
        decide.append(time.perf_counter() - t)
        if q % 4:
            router.finish(f"q{q}")  # keep some load in flight, as in serving
    route = list(router.metrics.decision_seconds)
    print(
        "| workers | blocks indexed (entries) | build (block events/s) | peak MiB | bytes/entry "
        f"| index walk p50 / p99 ms ({n_blocks} blocks) | workers matched "
        "| route (index + policy) p50 / p99 ms | hash + route p50 / p99 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.workers} | {idx.num_blocks:,} ({idx.num_entries:,}) | {n_events / build_s:,.0f} "
        f"| {peak / 2**20:,.0f} | {peak / max(idx.num_entries, 1):.0f} "
        f"| {pct(walk, 0.5):.3f} / {pct(walk, 0.99):.3f} | {sum(m.bit_count() for _, m in groups)} "
        f"| {pct(route, 0.5):.3f} / {pct(route, 0.99):.3f} "
        f"| {pct(decide, 0.5):.3f} / {pct(decide, 0.99):.3f} |"
    )


if __name__ == "__main__":
    main()

"""How long a full garbage collection stalls the frontend, with and without the start-up freeze.

    .venv/bin/python benchmarks/gc_pause.py [--model DIR]

Builds what a `tandem serve` frontend holds once it is ready (its imports, the model's tokenizer and
chat template, the app, the router), then times full collections: as Python leaves them, and after
`freeze_startup_heap()` (what `tandem serve` and `tandem worker` now call before they print ready).
A full collection runs on the event loop, so its time is a stall of every stream being served.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time

from tandem import env


def timed_collections(n: int = 5) -> float:
    """Median milliseconds of `n` full collections."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(env.models_dir() / "smollm2-135m-instruct"))
    args = ap.parse_args()

    from tandem.cli.worker import freeze_startup_heap
    from tandem.control.discovery import MemoryDiscovery
    from tandem.frontend.app import create_app
    from tandem.router.backend import RouterBackend
    from tandem.router.basic import make_policy

    async def ready_frontend() -> object:
        app = create_app(RouterBackend(MemoryDiscovery(), make_policy("kv")))
        fe = app.state.frontend
        await fe.tokenizers.get(args.model)
        return app

    app = asyncio.run(ready_frontend())
    tracked = len(gc.get_objects())
    before = timed_collections()
    freeze_startup_heap()
    after = timed_collections()
    print(f"frontend at ready: {tracked:,} tracked objects ({type(app).__name__} app, {args.model})")
    print("| heap | full collection ms (median of 5) |")
    print("| --- | --- |")
    print(f"| as Python leaves it | {before:.1f} |")
    print(f"| after freeze_startup_heap() | {after:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replay the Mooncake conversation trace through a simulated fleet and print a table.

    python benchmarks/replay_mooncake.py --workers 4 --router round-robin --out x.json
    python benchmarks/replay_mooncake.py --workers 4 8 --router all
    python benchmarks/replay_mooncake.py --limit 300 --length-divisor 8    # a quick look

Engine settings default to Dynamo's replay of this trace (block size 512, 2,048 blocks a worker,
256 sequences, 8,192 batched tokens, polynomial timing), so round-robin rows compare directly with
`/work/shared/bench/dynamo-cpu.md` "Trace replay". Same options as `tandem sim`.
"""

from __future__ import annotations

import argparse
import sys

from tandem.cli.sim import add_replay_args, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_replay_args(parser)
    run_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

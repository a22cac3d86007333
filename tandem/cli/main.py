"""The `tandem` command: one argparse parser whose subcommands live in sibling modules.

Each module named in SUBCOMMANDS exposes `add_parser(subparsers)`, which adds its parser and sets
`func` (taking the parsed args, returning an exit code or None) with `set_defaults`. A module that does
not exist yet is skipped, so subcommands can land one at a time. Every module is imported to build the
parser, so keep heavy imports (torch, fastapi, ...) inside `func`, not at module top.
Library code raises `TandemError`s; here they become a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from tandem.protocol.errors import TandemError

SUBCOMMANDS = ("model", "generate", "serve", "frontend", "worker", "bench", "sim")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

log = logging.getLogger(__name__)


def _subcommand_module(name: str) -> ModuleType | None:
    qualified = f"tandem.cli.{name}"
    try:
        return importlib.import_module(qualified)
    except ModuleNotFoundError as e:
        # Only the subcommand's own absence is expected; a missing dependency inside it is a real bug.
        if e.name == qualified:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated LLM inference serving.")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="default: INFO"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _subcommand_module(name)
        if module is not None:
            module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        code = args.func(args)
    except TandemError as e:
        log.debug("command failed", exc_info=True)
        print(f"tandem {args.command}: {e}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

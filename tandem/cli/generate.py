"""`tandem generate`: one prompt through the offline engine, printed as text or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from tandem.engine.config import EngineConfig
from tandem.engine.request import SamplingParams
from tandem.engines.factory import ENGINES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate a completion for one prompt, offline")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    p.add_argument("--prompt", required=True, help="raw completion prompt (no chat template)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--engine", choices=ENGINES, default="builtin")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="print prompt_token_ids, token_ids and text as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem.llm import LLM

    config = EngineConfig(block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens)
    llm = LLM(args.model, engine=args.engine, dtype=args.dtype, device=args.device, config=config)
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    (c,) = llm.generate([args.prompt], sampling)
    if args.json:
        json.dump(
            {
                "prompt_token_ids": c.prompt_token_ids,
                "token_ids": c.token_ids,
                "text": c.text,
                "finish_reason": c.finish_reason,
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
    else:
        sys.stdout.write(c.text + "\n")
    return 0

"""The frontend's detokenizer per streamed token: byte table, `DecodeStream`, and the Python version.

    .venv/bin/python benchmarks/detokenize.py [--model DIR] [--tokens 200] [--requests 300] [--rounds 5]

Streams `--requests` requests of `--tokens` tokens each through `IncrementalDetokenizer` one token a
step, as a streaming frontend does (ids from encoding mixed ASCII and multi-byte text, so some steps
end inside a character). Each variant must give the tokenizer's own `decode` of the ids. Rounds
alternate the variants; the table reports the median microseconds per token and the ratio to
`DecodeStream`, the version the frontend used before the byte table.
Default model: SmolLM2-135M-Instruct as `tandem model smollm2` converts it (byte-level BPE).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from tandem import env
from tandem.frontend.detokenize import IncrementalDetokenizer, byte_table

TEXT = "The capital of France is Paris. Ça va? 日本語のテキスト, naïve café — 🙂 emoji; code: x = f(y) + 42\n"
VARIANTS = {
    "byte table": {},
    "DecodeStream": {"force_stream": True},
    "Python": {"force_python": True},
}


def run(tokenizer: Any, ids: list[int], requests: int, kwargs: dict[str, bool]) -> tuple[float, str]:
    """Microseconds per token over `requests` streams of `ids`, and the last stream's text."""
    text = ""
    start = time.perf_counter()
    for _ in range(requests):
        detok = IncrementalDetokenizer(tokenizer, **kwargs)
        step = detok.step
        parts = [step([i]) for i in ids]
        parts.append(detok.flush())
        text = "".join(parts)
    return (time.perf_counter() - start) / (requests * len(ids)) * 1e6, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(env.models_dir() / "smollm2-135m-instruct"))
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    start = time.perf_counter()
    if byte_table(tokenizer) is None:
        raise SystemExit(f"{args.model}: not a byte-level BPE tokenizer (no byte table)")
    built = time.perf_counter() - start
    ids = (tokenizer(TEXT * 20, add_special_tokens=False)["input_ids"] * 8)[: args.tokens]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            us, text = run(tokenizer, ids, args.requests, VARIANTS[name])
            if text != expected:
                raise SystemExit(f"{name}: the text differs from tokenizer.decode")
            times[name].append(us)
    print(f"model {args.model}: vocabulary {len(tokenizer)}, byte table built in {built * 1e3:.0f} ms")
    print(f"{args.requests} streams of {len(ids)} tokens, one token a step, {args.rounds} rounds")
    base = statistics.median(times["DecodeStream"])
    print(f"{'variant':14s} {'us/token':>9s} {'vs DecodeStream':>16s}")
    for name, ts in times.items():
        us = statistics.median(ts)
        print(f"{name:14s} {us:9.2f} {us / base:15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

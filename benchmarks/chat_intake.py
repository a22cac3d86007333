"""Multi-turn chats: what the frontend's chat token cache saves, offline and live.

    .venv/bin/python benchmarks/chat_intake.py [--model DIR] [--chats 8] [--turns 10] [--rounds 2]

Each turn of a conversation sends every earlier message again, so without reuse the frontend
re-tokenizes the whole conversation on every turn (BPE, ~1-3 us a token on one core).

Offline: one conversation of `--turns` turns (user messages of `--user-words` words, answers of
`--answer-words`), each turn's prompt tokenized whole (`ModelTokenizer.encode`) and through the piece
cache (`encode_chat`); both must give the same ids.

Live: `tandem serve --engine sim --workers 2` on the model's tokenizer and config, with the cache off
(TANDEM_CHAT_TOKEN_CACHE_CHARS=0) and on, alternating `--rounds` times. `--chats` clients each hold
a conversation of `--turns` turns, streaming, appending the answer they got to their history. Reports
TTFT over all turns and the frontend process's CPU time per request (from /proc).
Default model: SmolLM2-135M-Instruct as `tandem model smollm2` converts it (context 8,192).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from serve_proc import cpu_seconds, serving

from tandem import env
from tandem.frontend.preprocess import ModelTokenizer
from tandem.protocol.openai import ChatMessage

REPO = Path(__file__).resolve().parents[1]
TANDEM = str(REPO / ".venv/bin/tandem")
WORDS = (REPO / "README.md").read_text().split()


def paragraph(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def offline(args: argparse.Namespace) -> None:
    tok = ModelTokenizer(args.model)
    cache = tok._pieces
    if cache is None:
        print("this tokenizer gets no piece cache (see tandem/frontend/chat_tokens.py)")
        return
    rng = random.Random(0)
    messages = [ChatMessage(role="system", content=paragraph(rng, 60))]
    rows: list[tuple[int, int, str, float, float]] = []
    for turn in range(1, args.turns + 1):
        messages.append(ChatMessage(role="user", content=paragraph(rng, args.user_words)))
        text = tok.render_chat(messages)
        whole, cached = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            ids = tok.encode(text, False)
            t1 = time.perf_counter()
            cache._ids.clear()  # each sample starts from the previous turns' pieces only
            for prev in rows:
                cache.encode(prev[2])
            t2 = time.perf_counter()
            got = cache.encode(text)  # what `encode_chat` does, without an event loop around it
            t3 = time.perf_counter()
            assert got == ids, f"turn {turn}: cached ids differ"
            whole.append(t1 - t0)
            cached.append(t3 - t2)
        rows.append((turn, len(ids), text, statistics.median(whole), statistics.median(cached)))
        messages.append(ChatMessage(role="assistant", content=paragraph(rng, args.answer_words)))
    print(f"Offline, {Path(args.model).name}: one conversation, median of 5 per turn")
    print("| turn | prompt tokens | whole text ms | with the cache ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for turn, n, _, w, c in rows:
        if turn in (1, 2) or turn % 4 == 0 or turn == args.turns:
            print(f"| {turn} | {n:,} | {w * 1e3:.2f} | {c * 1e3:.2f} | {w / c:.1f}x |")
    print()


async def conversation(client: httpx.AsyncClient, args: argparse.Namespace, seed: int) -> list[float]:
    rng = random.Random(seed)
    messages: list[dict[str, str]] = [{"role": "system", "content": paragraph(rng, 60)}]
    ttfts = []
    for _ in range(args.turns):
        messages.append({"role": "user", "content": paragraph(rng, args.user_words)})
        body = {"model": "chat", "messages": messages, "max_tokens": args.answer_tokens, "stream": True}
        body["ignore_eos"] = True
        start = time.perf_counter()
        first = 0.0
        answer = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if delta and not first:
                    first = time.perf_counter()
                answer.append(delta)
        ttfts.append((first or time.perf_counter()) - start)
        messages.append({"role": "assistant", "content": "".join(answer)})
    return ttfts


def live_round(args: argparse.Namespace, cache_on: bool) -> dict[str, float]:
    environ = dict(os.environ, TANDEM_CHAT_TOKEN_CACHE_CHARS="16000000" if cache_on else "0")
    cmd = [TANDEM, "--log-level", "WARNING", "serve", "--model", args.model, "--served-model-name", "chat"]
    cmd += ["--engine", "sim", "--workers", "2", "--speedup", str(args.speedup), "--port", str(args.port)]
    with serving(cmd, environ) as proc:

        async def run() -> list[float]:
            limits = httpx.Limits(max_connections=args.chats)
            base = f"http://127.0.0.1:{args.port}"
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
                runs = [conversation(client, args, seed) for seed in range(args.chats)]
                return [t for chat in await asyncio.gather(*runs) for t in chat]

        cpu0 = cpu_seconds(proc.pid)
        ttfts = np.array(asyncio.run(run())) * 1e3
        cpu = cpu_seconds(proc.pid) - cpu0
    p50, p90, p99 = np.percentile(ttfts, [50, 90, 99])
    return {"p50": p50, "p90": p90, "p99": p99, "cpu_ms": cpu * 1e3 / len(ttfts), "n": len(ttfts)}


def live(args: argparse.Namespace) -> None:
    rounds: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for cache_on in (False, True):
            rounds[cache_on].append(live_round(args, cache_on))
    print(
        f"Live, tandem serve --engine sim --workers 2 --speedup {args.speedup:g}: {args.chats} chats x "
        f"{args.turns} turns, {args.user_words}-word questions, {args.answer_tokens}-token answers "
        f"(medians of {args.rounds} rounds)"
    )
    print("| chat token cache | requests | TTFT p50 / p90 / p99 ms | frontend CPU ms / request |")
    print("| --- | --- | --- | --- |")
    for cache_on, runs in rounds.items():

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        ttft = f"{med('p50'):.1f} / {med('p90'):.1f} / {med('p99'):.1f}"
        name = "on" if cache_on else "off"
        print(f"| {name} | {int(med('n'))} | {ttft} | {med('cpu_ms'):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(env.models_dir() / "smollm2-135m-instruct"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-words", type=int, default=250)
    parser.add_argument("--answer-words", type=int, default=80, help="offline answers")
    parser.add_argument("--answer-tokens", type=int, default=100, help="live answers")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--speedup", type=float, default=1.0, help="the simulated engine's speed-up")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--skip-live", action="store_true")
    args = parser.parse_args()
    offline(args)
    if not args.skip_live:
        live(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The measurement protocol of `bench_engine.py`, shared with `vllm_cpu_bench.py` (another venv).

Standard library only, so vLLM's venv can import it too. Every engine is driven through one callable,
`generate(prompts, max_tokens)`, which runs the prompts (token id lists) as one batch, greedy, with
EOS ignored, so that each prompt yields exactly `max_tokens` tokens, and returns when all are done.

    decode tok/s  = B * (N - 1) / (median T(B prompts, N tokens) - median T(B prompts, 1 token))
    prefill tok/s = prefill tokens / median T(prefill prompts, 1 token)

T(.., 1 token) is the time to first token of the whole batch (prefill plus one sampling), so the
difference is the time of the N - 1 decode steps alone. Every timed call gets prompts no other call
has seen, so a prefix cache never turns a prefill into a hit.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

Generate = Callable[[list[list[int]], int], None]

FIRST_ORDINARY_TOKEN = 100
"""Prompt ids are drawn from [100, vocab): SmolLM2's special tokens sit at the bottom of the vocab."""


@dataclass(frozen=True)
class Workload:
    batches: tuple[int, ...] = (1, 8, 32)
    """Decode batch sizes."""
    prompt_len: int = 128
    output_len: int = 128
    """Tokens each request generates in a decode run."""
    prefill_batch: int = 16
    """Prompts (of `prompt_len` tokens) in one prefill run: 16 x 128 = 2048 tokens."""
    repeats: int = 3
    vocab_size: int = 49152
    seed: int = 0

    @property
    def prefill_tokens(self) -> int:
        return self.prefill_batch * self.prompt_len


def prompt_sets(w: Workload) -> dict[str, list[list[int]]]:
    """Fresh random prompts for every run of the protocol, keyed by run name; the same seed gives
    the same prompts in every process."""
    rng = random.Random(w.seed)

    def prompts(n: int) -> list[list[int]]:
        return [
            [rng.randrange(FIRST_ORDINARY_TOKEN, w.vocab_size) for _ in range(w.prompt_len)] for _ in range(n)
        ]

    sets: dict[str, list[list[int]]] = {}
    for b in w.batches:
        sets[f"warm-b{b}"] = prompts(b)
        for r in range(w.repeats):
            sets[f"ttft-b{b}-r{r}"] = prompts(b)
            sets[f"full-b{b}-r{r}"] = prompts(b)
    sets["warm-prefill"] = prompts(w.prefill_batch)
    for r in range(w.repeats):
        sets[f"prefill-r{r}"] = prompts(w.prefill_batch)
    return sets


def _timed(generate: Generate, prompts: list[list[int]], max_tokens: int) -> float:
    t0 = time.perf_counter()
    generate(prompts, max_tokens)
    return time.perf_counter() - t0


def measure(generate: Generate, w: Workload, sets: dict[str, list[list[int]]]) -> dict[str, float]:
    """Runs the protocol; returns {"decode_b1": tok/s, ..., "prefill": tok/s, plus the raw medians}."""
    result: dict[str, float] = {}
    for b in w.batches:
        generate(sets[f"warm-b{b}"], 8)
        ttft = [_timed(generate, sets[f"ttft-b{b}-r{r}"], 1) for r in range(w.repeats)]
        full = [_timed(generate, sets[f"full-b{b}-r{r}"], w.output_len) for r in range(w.repeats)]
        t1, tn = statistics.median(ttft), statistics.median(full)
        result[f"ttft_s_b{b}"] = t1
        result[f"total_s_b{b}"] = tn
        result[f"decode_b{b}"] = b * (w.output_len - 1) / (tn - t1)
    generate(sets["warm-prefill"], 1)
    pre = [_timed(generate, sets[f"prefill-r{r}"], 1) for r in range(w.repeats)]
    result["prefill_s"] = statistics.median(pre)
    result["prefill"] = w.prefill_tokens / result["prefill_s"]
    return result


def workload_from_dict(d: dict) -> Workload:
    d = dict(d)
    d["batches"] = tuple(d["batches"])
    return Workload(**d)


def workload_to_dict(w: Workload) -> dict:
    return asdict(w)


def check_lengths(outputs: Sequence[int], max_tokens: int) -> None:
    """Every request must have generated exactly `max_tokens` (EOS ignored), or the numbers lie."""
    bad = [n for n in outputs if n != max_tokens]
    assert not bad, f"{len(bad)} requests generated {bad[:4]}... tokens, not {max_tokens}"

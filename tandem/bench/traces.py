"""Public workload traces as request lists: Mooncake JSONL (with prefix structure) and Azure CSV.

A `TraceRequest` carries lengths, its arrival time and (Mooncake) its prefix block ids; its prompt
tokens are made on demand by `prompt_token_ids()`, so a 12,000-request trace of ~12k-token prompts
(145M token ids) never sits in memory at once.

Mooncake expansion: hash id `h` stands for one block of `block_size` tokens, and its tokens are a
pure function of (seed, h, position), so equal ids give equal tokens in every request and process
(prefix caches then hit exactly where the trace says blocks are shared). The prompt is the blocks
of its ids concatenated and cut to `input_length`. Length scaling by a divisor `k` divides lengths
and the block size alike (`512 / k` tokens a block), which keeps the sharing structure intact.

Traces live outside the repository: the default folder is `<repo>/../shared/data/traces`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

MOONCAKE_BLOCK_SIZE = 512
"""Tokens per hash id in the Mooncake traces."""
MOONCAKE_CONVERSATION = "mooncake_conversation_trace.jsonl"
AZURE_CONVERSATION = "AzureLLMInferenceTrace_conv_2023.csv"

_OFFSET = np.uint64(0x632BE59BD9B4E019)


def default_trace_dir() -> Path:
    """`<repo root>/../shared/data/traces` (the repo root holds the `tandem` package)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "traces"


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array: a cheap, well-spread pure hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class TokenSpace:
    """How ids become tokens: ids in [vocab_lo, vocab_hi), a pure function of (seed, key, position)."""

    block_size: int = MOONCAKE_BLOCK_SIZE
    vocab_lo: int = 100
    """Lowest id used; keeps clear of special tokens at the bottom of most vocabularies."""
    vocab_hi: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.vocab_lo < self.vocab_hi:
            raise ValueError(f"need 0 <= vocab_lo < vocab_hi, got [{self.vocab_lo}, {self.vocab_hi})")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def blocks(self, keys: Sequence[int], num_tokens: int) -> list[int]:
        """Blocks of `block_size` tokens, one per key, concatenated and cut to `num_tokens`."""
        bs = self.block_size
        keys_u = np.asarray(keys, dtype=np.int64).astype(np.uint64)
        pos = np.arange(bs, dtype=np.uint64)
        with np.errstate(over="ignore"):
            # (seed, key) -> a 64-bit block salt; salt + position -> a token. Vectorised: ~1 us/block.
            # The odd offset keeps key 0 / seed 0 away from mix64's fixed point at 0.
            seed = np.uint64(self.seed & 0xFFFFFFFF)
            salt = _mix64(keys_u * np.uint64(0x9E3779B97F4A7C15) + seed + _OFFSET)
            raw = _mix64(salt[:, None] + pos[None, :] * np.uint64(0xD1B54A32D192ED03))
        span = np.uint64(self.vocab_hi - self.vocab_lo)
        tokens = (raw % span).astype(np.int64) + self.vocab_lo
        return tokens.reshape(-1)[:num_tokens].tolist()


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace. Prompt tokens are generated on demand (see module docstring)."""

    arrival_s: float
    """Seconds since the trace's start, after time scaling."""
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    """Prefix block ids (Mooncake); empty where the trace has no prefix information."""
    index: int = 0
    """Position in the trace; salts the tokens of requests without prefix information."""
    space: TokenSpace = field(default_factory=TokenSpace, repr=False, compare=False)

    def prompt_token_ids(self) -> list[int]:
        """The prompt: `input_len` ids, the same on every call."""
        bs = self.space.block_size
        keys = list(self.hash_ids)
        need = -(-self.input_len // bs)
        if len(keys) < need:
            # Ids the trace did not name get keys no trace id uses (negative), unique to this request.
            keys += [-(self.index * 4096 + j + 1) for j in range(need - len(keys))]
        return self.space.blocks(keys[:need], self.input_len)


def load_mooncake(
    path: str | Path | None = None,
    *,
    speedup: float = 1.0,
    length_divisor: int = 1,
    limit: int | None = None,
    vocab: tuple[int, int] = (100, 32000),
    seed: int = 0,
) -> list[TraceRequest]:
    """Read a Mooncake JSONL trace (`timestamp` ms, `input_length`, `output_length`, `hash_ids`).

    `speedup` divides arrival times; `length_divisor` (a divisor of 512) divides input and output
    lengths (rounded up, at least 1) and the block size. `path` defaults to the conversation trace
    in `default_trace_dir()`.
    """
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    if length_divisor < 1 or MOONCAKE_BLOCK_SIZE % length_divisor:
        raise ValueError(f"length_divisor must divide {MOONCAKE_BLOCK_SIZE}, got {length_divisor}")
    path = Path(path) if path is not None else default_trace_dir() / MOONCAKE_CONVERSATION
    space = TokenSpace(MOONCAKE_BLOCK_SIZE // length_divisor, vocab[0], vocab[1], seed)
    out: list[TraceRequest] = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            out.append(
                TraceRequest(
                    arrival_s=float(row["timestamp"]) / 1000.0 / speedup,
                    input_len=max(1, math.ceil(int(row["input_length"]) / length_divisor)),
                    output_len=max(1, math.ceil(int(row["output_length"]) / length_divisor)),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                    index=len(out),
                    space=space,
                )
            )
    return out


def load_azure(
    path: str | Path | None = None,
    *,
    speedup: float = 1.0,
    length_divisor: int = 1,
    limit: int | None = None,
    vocab: tuple[int, int] = (100, 32000),
    seed: int = 0,
) -> list[TraceRequest]:
    """Read an Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).

    Prompts are random tokens unique to each request (the trace has no prefix information);
    arrivals are seconds since the first row, divided by `speedup`.
    """
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    if length_divisor < 1:
        raise ValueError(f"length_divisor must be >= 1, got {length_divisor}")
    path = Path(path) if path is not None else default_trace_dir() / AZURE_CONVERSATION
    space = TokenSpace(MOONCAKE_BLOCK_SIZE, vocab[0], vocab[1], seed)
    out: list[TraceRequest] = []
    t0: datetime | None = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if limit is not None and len(out) >= limit:
                break
            # Timestamps carry 7 fractional digits; datetime takes at most 6.
            stamp = row["TIMESTAMP"].strip()
            head, _, frac = stamp.partition(".")
            t = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}" if frac else head)
            t0 = t0 or t
            out.append(
                TraceRequest(
                    arrival_s=(t - t0).total_seconds() / speedup,
                    input_len=max(1, math.ceil(int(row["ContextTokens"]) / length_divisor)),
                    output_len=max(1, math.ceil(int(row["GeneratedTokens"]) / length_divisor)),
                    index=len(out),
                    space=space,
                )
            )
    out.sort(key=lambda r: r.arrival_s)
    return out

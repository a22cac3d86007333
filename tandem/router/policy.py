"""Routing policies as pure functions: candidates and their state in, a worker id out. No I/O.

KV-aware cost of sending a request of `n` blocks to worker w (lower is better):

    cost(w) = overlap_weight * (n - overlap(w))                        prefill blocks left after the hit
            + decode_weight * s(n) * active_blocks(w)                   decode load: KV of running requests
            + queued_weight * queued_prefill_tokens(w) / block_size     prefill work already waiting there

    s(n) = min(1, long_prompt_tokens / (n * block_size))                1 when long_prompt_tokens is 0

A long prompt's time to first token is its own prefill plus the prefill queued ahead of it, so s(n)
shrinks its decode term: it goes where the queue is short even if that worker holds more decode KV.
Short requests, most of them, still spread decode KV (and so inter-token latency) by decode_weight.

temperature 0 picks the argmin (ties: least loaded, then a seeded random choice, else the id);
temperature > 0 samples from softmax(-cost / (temperature * spread)) so hot prefixes spread once
their holder is loaded enough. The simulator and the HTTP router call the same functions.

The weights are the trade: a high overlap_weight follows the cache (hit rate, less total prefill)
at the price of queueing on the holder; a high decode_weight balances KV (and ITL) at the price of
re-prefilling prefixes that another worker holds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    active_blocks: int = 0
    """KV blocks held by requests running (or routed and not finished) on the worker."""
    queued_prefill_tokens: int = 0
    """Prompt tokens routed to the worker whose prefill has not finished."""
    active_requests: int = 0
    capacity_blocks: int = 0
    """Total KV blocks of the worker (0: unknown)."""


@dataclass(frozen=True)
class KvPolicyConfig:
    overlap_weight: float = 1.0
    """Weight of this request's prefill work against load; higher favours cache hits over balance."""
    decode_weight: float = 1.0
    """Weight of active KV blocks (decode load)."""
    queued_weight: float = 1.0
    """Weight of prefill tokens already queued on the worker, in blocks."""
    temperature: float = 0.0
    """0: deterministic argmin. > 0: softmax sampling over normalised costs."""
    busy_threshold: float | None = None
    """Active blocks / capacity above which a worker takes no new request (None: never busy)."""
    long_prompt_tokens: float = 0
    """Prompts longer than this scale their decode term by long_prompt_tokens / length (0: off)."""

    def __post_init__(self) -> None:
        if min(self.overlap_weight, self.decode_weight, self.queued_weight) < 0:
            raise ValueError("overlap_weight, decode_weight and queued_weight must be >= 0")
        if self.long_prompt_tokens < 0:
            raise ValueError("long_prompt_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.busy_threshold is not None and not 0 < self.busy_threshold:
            raise ValueError("busy_threshold must be > 0")

    def decode_weight_for(self, num_tokens: int) -> float:
        """decode_weight * s(n) for a prompt of `num_tokens` (see the module docstring)."""
        cap = self.long_prompt_tokens
        if cap <= 0 or num_tokens <= cap:
            return self.decode_weight
        return self.decode_weight * cap / num_tokens


def kv_costs(
    num_request_blocks: int,
    overlaps: Mapping[str, int],
    loads: Sequence[WorkerLoad],
    block_size: int,
    config: KvPolicyConfig,
) -> dict[str, float]:
    costs = {}
    dw = config.decode_weight_for(num_request_blocks * block_size)
    for load in loads:
        prefill_blocks = num_request_blocks - min(overlaps.get(load.worker_id, 0), num_request_blocks)
        costs[load.worker_id] = (
            config.overlap_weight * prefill_blocks
            + dw * load.active_blocks
            + config.queued_weight * load.queued_prefill_tokens / block_size
        )
    return costs


def available(loads: Sequence[WorkerLoad], busy_threshold: float | None) -> list[WorkerLoad]:
    """Workers under the busy threshold. Empty means shed the request (503) or queue it."""
    if busy_threshold is None:
        return list(loads)
    return [
        w for w in loads if w.capacity_blocks <= 0 or w.active_blocks / w.capacity_blocks < busy_threshold
    ]


def pick_kv(
    num_request_blocks: int,
    overlaps: Mapping[str, int],
    loads: Sequence[WorkerLoad],
    block_size: int,
    config: KvPolicyConfig,
    rng: random.Random | None = None,
) -> str | None:
    """The KV-aware choice, or None when every worker is past the busy threshold."""
    candidates = available(loads, config.busy_threshold)
    if not candidates:
        return None
    if config.temperature <= 0 or len(candidates) == 1:
        # One pass, no intermediate dicts: this runs over every worker of the fleet per request.
        n = num_request_blocks
        ow, qw = config.overlap_weight, config.queued_weight
        dw = config.decode_weight_for(n * block_size)
        best: tuple[float, float] | None = None
        tied: list[str] = []
        for w in candidates:
            left = n - min(overlaps.get(w.worker_id, 0), n)
            queued = w.queued_prefill_tokens / block_size
            key = (ow * left + dw * w.active_blocks + qw * queued, w.active_blocks + queued)
            if best is None or key < best:
                best, tied = key, [w.worker_id]
            elif key == best:
                tied.append(w.worker_id)
        # Ties: a seeded random choice spreads an idle fleet; without an rng the lowest id is stable.
        return min(tied) if rng is None or len(tied) == 1 else rng.choice(sorted(tied))
    costs = kv_costs(num_request_blocks, overlaps, candidates, block_size, config)
    lo = min(costs.values())
    spread = max(max(costs.values()) - lo, 1.0)
    weights = [math.exp(-(costs[w.worker_id] - lo) / (spread * config.temperature)) for w in candidates]
    return (rng or random).choices([w.worker_id for w in candidates], weights=weights)[0]


def pick_round_robin(loads: Sequence[WorkerLoad], counter: int) -> str:
    return loads[counter % len(loads)].worker_id


def pick_least_loaded(loads: Sequence[WorkerLoad]) -> str:
    return min(loads, key=lambda w: (w.active_requests, w.active_blocks, w.worker_id)).worker_id


def pick_random(loads: Sequence[WorkerLoad], rng: random.Random | None = None) -> str:
    return (rng or random).choice(loads).worker_id

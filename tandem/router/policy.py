"""Routing policies as pure functions: candidates and their state in, a worker id out. No I/O.

KV-aware cost of sending a request of `n` blocks to worker w (lower is better):

    cost(w) = overlap_weight * (n - overlap(w))                        prefill blocks left after the hit
            + decode_weight * s(n) * active_blocks(w)                   decode load: KV of running requests
            + queued_weight * queued_prefill_tokens(w) / block_size     prefill work already waiting there

    s(n) = min(1, long_prompt_tokens / (n * block_size))                1 when long_prompt_tokens is 0

Given each worker's `step_tokens` (its max_num_batched_tokens; the KV router passes them when its
`batch_queued_prefill` is on, as in `tandem serve`), queued prefill that fits in the worker's next
engine step beside this request's own uncached tokens costs nothing: it is computed in the same step,
not ahead of it. Without this, a worker that had just finished a batch
of short requests looked busy after a dozen replacements, and the rest of a client's burst went to a
worker in the middle of decoding: each prefill step there stalled its decodes, the batches split and
stayed split (closed loop c=64, 2 workers: 109 req/s and 11.9 ms ITL against least-loaded's 147 and
6.8; docs/benchmarks.md, session 11). Longer prompts, which fill a step alone, are unchanged.

A long prompt's time to first token is its own prefill plus the prefill queued ahead of it, so s(n)
shrinks its decode term: it goes where the queue is short even if that worker holds more decode KV.
Short requests, most of them, still spread decode KV (and so inter-token latency) by decode_weight.

A worker is busy when its active blocks reach `busy_threshold` of its KV capacity, or its queued
prefill tokens reach `busy_prefill_tokens`; busy workers take no new request, and a request that finds
every candidate busy is shed (503) or waits in the router's queue (`router/admission.py`). A worker
with nothing routed to it is never busy, so one request larger than a threshold still runs.

temperature 0 picks the argmin (ties: least loaded, then a seeded random choice, else the id);
temperature > 0 samples from softmax(-cost / (temperature * spread)) so hot prefixes spread once
their holder is loaded enough. The simulator and the HTTP router call the same functions.

The weights are the trade: a high overlap_weight follows the cache (hit rate, less total prefill)
at the price of queueing on the holder; a high decode_weight balances KV (and ITL) at the price of
re-prefilling prefixes that another worker holds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np


class WorkerLoad(msgspec.Struct, frozen=True):
    """One candidate worker as a policy sees it. A msgspec struct, not a dataclass: the HTTP router
    builds one per candidate per request, and at 1,000 workers a frozen dataclass's __init__ alone
    cost ~2 ms a request (this: ~0.25 ms)."""

    worker_id: str
    active_blocks: int = 0
    """KV blocks held by requests running (or routed and not finished) on the worker."""
    queued_prefill_tokens: int = 0
    """Prompt tokens routed to the worker whose prefill has not finished."""
    active_requests: int = 0
    capacity_blocks: int = 0
    """Total KV blocks of the worker (0: unknown)."""
    step_tokens: int = 0
    """Prompt tokens one engine step of the worker computes at most (0: unknown)."""


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
    """Active blocks / capacity at which a worker takes no new request (None: no limit)."""
    busy_prefill_tokens: float | None = None
    """Queued prefill tokens at which a worker takes no new request (None: no limit)."""
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
        if self.busy_prefill_tokens is not None and not 0 < self.busy_prefill_tokens:
            raise ValueError("busy_prefill_tokens must be > 0")

    @property
    def sheds(self) -> bool:
        """Whether a worker can be busy (a busy rule is set)."""
        return self.busy_threshold is not None or self.busy_prefill_tokens is not None

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
    """Each worker's cost (the module docstring's formula), by worker id."""
    overlap, active, queued, _, steps = _arrays(overlaps, loads)
    queued = _queued_cost(num_request_blocks, overlap, queued, steps, block_size)
    costs = _costs(num_request_blocks, overlap, active, queued, block_size, config)
    return {w.worker_id: float(c) for w, c in zip(loads, costs, strict=True)}


def pick_kv(
    num_request_blocks: int,
    overlaps: Mapping[str, int],
    loads: Sequence[WorkerLoad],
    block_size: int,
    config: KvPolicyConfig,
    rng: random.Random | None = None,
) -> str | None:
    """The KV-aware choice, or None when every worker is past the busy threshold."""
    overlap, active, queued, capacity, steps = _arrays(overlaps, loads)
    ids = [w.worker_id for w in loads]
    i = pick_kv_arrays(
        num_request_blocks, overlap, active, queued, capacity, ids, block_size, config, rng, steps
    )
    return None if i is None else ids[i]


def pick_kv_arrays(
    num_request_blocks: int,
    overlap: np.ndarray,
    active_blocks: np.ndarray,
    queued_tokens: np.ndarray,
    capacity_blocks: np.ndarray | None,
    ids: Sequence[str],
    block_size: int,
    config: KvPolicyConfig,
    rng: random.Random | None = None,
    step_tokens: np.ndarray | None = None,
) -> int | None:
    """`pick_kv` over arrays (one entry per candidate, named by `ids`): the index of the choice.

    The KV router scores its whole fleet this way, a few array operations per decision instead of
    a Python loop over every worker. `capacity_blocks` may be None when no busy threshold is set;
    `step_tokens` (each worker's step budget, 0: unknown) None counts every queued token.
    """
    ok = _not_busy(active_blocks, queued_tokens, capacity_blocks, config) if config.sheds else None
    if ok is not None and not ok.any():
        return None
    queued = _queued_cost(num_request_blocks, overlap, queued_tokens, step_tokens, block_size)
    costs = _costs(num_request_blocks, overlap, active_blocks, queued, block_size, config)
    if ok is not None:
        costs = np.where(ok, costs, np.inf)
    num_ok = len(ids) if ok is None else int(ok.sum())
    if config.temperature <= 0 or num_ok == 1:
        # Ties on cost go to the least loaded (active blocks + queued blocks), then a seeded random
        # choice (spreads an idle fleet); without an rng the lowest id is stable.
        tied = np.flatnonzero(costs == costs.min())
        if len(tied) > 1:
            load = active_blocks[tied] + queued_tokens[tied] / block_size
            tied = tied[load == load.min()]
        if len(tied) == 1:
            return int(tied[0])
        by_id = {ids[int(i)]: int(i) for i in tied}
        return by_id[min(by_id) if rng is None else rng.choice(sorted(by_id))]
    finite = np.flatnonzero(np.isfinite(costs))
    c = costs[finite]
    lo = c.min()
    spread = max(float(c.max() - lo), 1.0)
    weights = np.exp(-(c - lo) / (spread * config.temperature))
    return int((rng or random).choices(finite.tolist(), weights=weights.tolist())[0])


def _not_busy(
    active_blocks: np.ndarray,
    queued_tokens: np.ndarray,
    capacity_blocks: np.ndarray | None,
    config: KvPolicyConfig,
) -> np.ndarray:
    """True for the candidates under every busy limit (see the module docstring)."""
    ok = np.ones(len(active_blocks), bool)
    if config.busy_threshold is not None:
        assert capacity_blocks is not None, "a busy threshold needs the capacities"
        with np.errstate(divide="ignore", invalid="ignore"):
            ok &= (capacity_blocks <= 0) | (active_blocks / capacity_blocks < config.busy_threshold)
    if config.busy_prefill_tokens is not None:
        ok &= queued_tokens < config.busy_prefill_tokens
    return ok


def _queued_cost(
    n: int,
    overlap: np.ndarray,
    queued_tokens: np.ndarray,
    step_tokens: np.ndarray | None,
    block_size: int,
) -> np.ndarray:
    """The queued prefill tokens that count as a queue ahead of this request: those past what the
    worker's next step holds beside the request's own uncached tokens (all of them without step
    budgets, or for a worker whose budget is unknown)."""
    if step_tokens is None:
        return queued_tokens
    own = (n - np.minimum(overlap, n)) * block_size
    room = np.where(step_tokens > 0, np.maximum(step_tokens - own, 0), 0)
    return np.maximum(queued_tokens - room, 0)


def _costs(
    n: int,
    overlap: np.ndarray,
    active_blocks: np.ndarray,
    queued_tokens: np.ndarray,
    block_size: int,
    config: KvPolicyConfig,
) -> np.ndarray:
    left = n - np.minimum(overlap, n)
    dw = config.decode_weight_for(n * block_size)
    return (
        config.overlap_weight * left
        + dw * active_blocks
        + config.queued_weight * (queued_tokens / block_size)
    )


def _arrays(
    overlaps: Mapping[str, int], loads: Sequence[WorkerLoad]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Overlap, active blocks, queued prefill tokens, capacity and step budget of each of `loads`."""
    n = len(loads)
    return (
        np.fromiter((overlaps.get(w.worker_id, 0) for w in loads), np.int64, n),
        np.fromiter((w.active_blocks for w in loads), np.int64, n),
        np.fromiter((w.queued_prefill_tokens for w in loads), np.int64, n),
        np.fromiter((w.capacity_blocks for w in loads), np.int64, n),
        np.fromiter((w.step_tokens for w in loads), np.int64, n),
    )


def pick_round_robin(loads: Sequence[WorkerLoad], counter: int) -> str:
    return loads[counter % len(loads)].worker_id


def pick_least_loaded(loads: Sequence[WorkerLoad]) -> str:
    return min(loads, key=lambda w: (w.active_requests, w.active_blocks, w.worker_id)).worker_id


def pick_random(loads: Sequence[WorkerLoad], rng: random.Random | None = None) -> str:
    return (rng or random).choice(loads).worker_id

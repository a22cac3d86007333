"""What a worker tells the control plane about itself: identity, capacity, hardware, live load.

One `WorkerInfo` per registered worker; the registry keys it by `worker_id` and keeps it only while
the worker's lease is alive. `load` is refreshed by the worker (a few times a second at most), so it
is an estimate: the router adds its own count of requests in flight.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from tandem.protocol.kv_layout import KvLayout

Role = Literal["agg", "prefill", "decode"]
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
"""Upper bounds (s) of the engines' queue and prefill histograms (`WorkerStats.queue_buckets`): dense
from 10 to 300 ms, where a loaded engine's queue and prefill times sit, so quantiles read true."""
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (s) of inter-token-gap histograms (the engines' `decode_buckets`, the frontend's ITL)."""
Status = Literal["ready", "draining"]


class Hardware(msgspec.Struct, frozen=True, omit_defaults=True):
    device: str = "cpu"
    """Device type: "cpu", "cuda", "sim"."""
    name: str = ""
    """Model of the device, e.g. "NVIDIA H100 80GB HBM3"."""
    count: int = 1
    memory_bytes: int = 0
    """Memory of one device."""


class WorkerLoad(msgspec.Struct, frozen=True, omit_defaults=True):
    active_requests: int = 0
    """Requests the worker is serving (queued or running)."""
    num_running: int = 0
    num_waiting: int = 0
    num_used_blocks: int = 0
    kv_usage: float = 0.0
    """Used / total KV blocks."""


class WorkerInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    worker_id: str
    address: str
    """host:port of the worker's request-plane server."""
    model: str
    """Served model name (what requests put in `model`)."""
    model_dir: str
    role: Role = "agg"
    block_size: int = 16
    num_blocks: int = 0
    """KV capacity in blocks."""
    max_model_len: int = 0
    max_num_batched_tokens: int = 0
    """Prompt tokens one engine step computes at most (0: unknown); the KV router's step budget."""
    hardware: Hardware = Hardware()
    status: Status = "ready"
    load: WorkerLoad = WorkerLoad()
    engine: str = ""
    kv_layout: KvLayout | None = None
    """How this worker's KV blocks are laid out; None if it takes no part in KV transfer."""
    kv_address: str = ""
    """host:port of the worker's KV block server (disaggregation), "" if none."""
    takes_announcements: bool = False
    """The worker's engine waits for requests routers announce (`ExpectCall`, `regroup_expect_steps`
    > 0); routers send the notice only then, as an engine that ignores it would only pay to read it."""


class WorkerStats(msgspec.Struct, frozen=True, tag="stats", array_like=True):
    """A worker's answer to a `stats` call: its engine counters as of a recent step (`AsyncEngine.stats`)."""

    worker_id: str
    status: Status
    load: WorkerLoad
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    num_steps: int = 0
    busy_seconds_total: float = 0.0
    """Engine time spent in steps (forward pass and sampling)."""
    kv_loads: int = 0
    """KV loads from peers started (disaggregated decode); failures are counted apart."""
    kv_load_failures: int = 0
    kv_load_seconds_total: float = 0.0
    """Wall time of finished KV loads: connect, copy (or receive) every block, tell the peer."""
    kv_load_bytes_total: int = 0
    prefill_steps: int = 0
    """Engine steps that computed prompt tokens; `num_steps - prefill_steps` were decode-only."""
    prefill_requests_total: int = 0
    """Prompt pieces computed over those steps (their mean prefill batch = this / prefill_steps)."""
    queue_seconds_total: float = 0.0
    """Requests' time from reaching the engine to their first step, summed over
    `queued_requests_total` (see `tandem.engine.phases`)."""
    queued_requests_total: int = 0
    prefill_seconds_total: float = 0.0
    """From a request's first step to its first token here, summed over `first_tokens_total`."""
    first_tokens_total: int = 0
    decode_seconds_total: float = 0.0
    """Gaps between a request's later tokens, summed over `decode_tokens_total` (engine-side ITL)."""
    decode_tokens_total: int = 0
    queue_buckets: tuple[int, ...] = ()
    """The queue times' histogram: counts per bucket of `LATENCY_BUCKETS` (not cumulative), then
    the count past the last bound; () from a worker that does not keep it."""
    prefill_buckets: tuple[int, ...] = ()
    """The prefill times' histogram, buckets as `queue_buckets`."""
    decode_buckets: tuple[int, ...] = ()
    """The decode gaps' histogram, over `GAP_BUCKETS`."""

"""Trace replay on the fleet simulator: one call from a trace name to a metrics summary.

`run_replay` is what `benchmarks/replay_mooncake.py` and the `tandem sim` command call. Engine
defaults are Dynamo's replay settings for the Mooncake trace (block size = the trace's hash block,
2,048 blocks a worker, 256 sequences, 8,192 batched tokens, Dynamo's polynomial timing), so a
round-robin run compares with `dynamo_replay.py` figures directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.bench.traces import MOONCAKE_BLOCK_SIZE, TraceRequest, load_azure, load_mooncake
from tandem.engine.config import EngineConfig
from tandem.engines.sim.timing import PolynomialTiming, ProfileTiming, TimingModel
from tandem.sim.fleet import Fleet, FleetConfig
from tandem.sim.metrics import RunMetrics
from tandem.sim.routing import make_router


@dataclass(frozen=True)
class ReplaySpec:
    """Everything one replay needs besides the router and worker count."""

    trace: str = "mooncake"
    """"mooncake", "azure", "random" (`limit` requests of `input_len` unique tokens, `output_len`
    out, all at time 0: use with `concurrency`), or a path to a .jsonl (Mooncake format) or .csv
    (Azure format) file."""
    input_len: int = 100
    output_len: int = 50
    trace_dir: str | None = None
    """Folder of the named traces; None: `<repo>/../shared/data/traces`."""
    limit: int | None = None
    """Replay only the first N requests."""
    arrival_speedup: float = 1.0
    """Divides arrival times (a compressed trace arrives faster)."""
    length_divisor: int = 1
    """Divides prompt and output lengths (and the block size, for Mooncake)."""
    num_blocks: int = 2048
    block_size: int | None = None
    """None: the trace's block size after length scaling (512 / divisor)."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    engine_speedup: float = 1.0
    """Divides every step's modelled time (Dynamo's `--speedup-ratio`)."""
    timing_profile: str | None = None
    """A `ProfileTiming` JSON file; None: Dynamo's polynomials."""
    concurrency: int | None = None
    """Closed loop with this many requests in flight, trace order, arrival times ignored
    (see `Fleet.run`); None: open loop at the trace's arrival times."""
    router_queue_size: int = 0
    """With a busy limit in the KV policy: requests that may wait for room (see `Fleet`)."""
    router_queue_timeout: float = 30.0


def load_trace(spec: ReplaySpec) -> list[TraceRequest]:
    """The spec's requests, sorted by arrival."""
    kw: dict[str, Any] = dict(
        speedup=spec.arrival_speedup, length_divisor=spec.length_divisor, limit=spec.limit
    )
    folder = Path(spec.trace_dir) if spec.trace_dir else None
    name = spec.trace
    if name == "random":
        lengths = (spec.input_len // spec.length_divisor, spec.output_len // spec.length_divisor)
        return [TraceRequest(0.0, *lengths, index=i) for i in range(spec.limit or 1000)]
    if name == "mooncake":
        return load_mooncake(folder / "mooncake_conversation_trace.jsonl" if folder else None, **kw)
    if name == "azure":
        return load_azure(folder / "AzureLLMInferenceTrace_conv_2023.csv" if folder else None, **kw)
    if name.endswith(".csv"):
        return load_azure(name, **kw)
    return load_mooncake(name, **kw)


def fleet_config(spec: ReplaySpec, num_workers: int) -> FleetConfig:
    block_size = spec.block_size or MOONCAKE_BLOCK_SIZE // spec.length_divisor
    timing: TimingModel = (
        ProfileTiming.from_json(spec.timing_profile) if spec.timing_profile else PolynomialTiming()
    )
    engine = EngineConfig(
        block_size=block_size,
        num_blocks=spec.num_blocks,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=1 << 22,
        cache_blocks_on_schedule=True,
    )
    return FleetConfig(num_workers=num_workers, engine=engine, timing=timing, speedup=spec.engine_speedup)


def replay(
    spec: ReplaySpec,
    num_workers: int,
    router: str,
    requests: list[TraceRequest] | None = None,
    kv_policy: Mapping[str, float] | None = None,
) -> RunMetrics:
    """Replay the spec's trace (or `requests`, if given) through a fresh fleet. `kv_policy`: KV
    router fields replacing the named router's (see `make_router`)."""
    reqs = requests if requests is not None else load_trace(spec)
    fleet = Fleet(
        fleet_config(spec, num_workers),
        make_router(router, kv_policy),
        queue_size=spec.router_queue_size,
        queue_timeout=spec.router_queue_timeout,
    )
    return fleet.run(reqs, concurrency=spec.concurrency)


def run_replay(
    *,
    workers: int = 4,
    router: str = "round-robin",
    spec: ReplaySpec | None = None,
    **spec_fields: Any,
) -> dict[str, Any]:
    """Replay and summarise: `run_replay(workers=4, router="round-robin", limit=300)`.

    Keyword arguments beyond `workers`/`router` are `ReplaySpec` fields. Returns the metrics summary
    (see `RunMetrics.summary`) plus the settings that produced it.
    """
    spec = spec or ReplaySpec(**spec_fields)
    summary = replay(spec, workers, router).summary()
    summary.update(workers=workers, router=router, trace=spec.trace, limit=spec.limit)
    summary.update(arrival_speedup=spec.arrival_speedup, length_divisor=spec.length_divisor)
    return summary

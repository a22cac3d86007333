"""Timings of a disaggregated request: the router's prefill and hand-off histograms and the decode
worker's KV-load counters (sim engine, real request plane and KV hand-off on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from tandem.control.discovery import MemoryDiscovery
from tandem.engine.config import EngineConfig
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.router.backend import RouterBackend
from tandem.router.disagg import DisaggPolicy
from tandem.worker.worker import Worker, WorkerConfig
from tests.sim_model import sim_model_dir


async def test_disaggregated_request_records_prefill_handoff_and_kv_load(tmp_path: Path) -> None:
    model_dir = sim_model_dir(tmp_path)
    d = MemoryDiscovery()
    workers = []
    for role in ("prefill", "decode"):
        cfg = WorkerConfig(
            str(model_dir),
            engine="sim",
            worker_id=role,
            role=role,
            speedup=50,
            engine_config=EngineConfig(num_blocks=128),
        )
        workers.append(Worker(cfg, d))
        await workers[-1].start()
    backend = RouterBackend(d, "round-robin", disagg=DisaggPolicy(min_remote_prompt_tokens=8))
    try:
        req = GenerateRequest("r0", "simmodel", list(range(1, 100)), SamplingSpec(max_tokens=4))
        tokens = [t async for out in backend.generate(req) for t in out.new_token_ids]
        assert len(tokens) == 4
        m = backend.disagg_metrics
        assert _count(m.prefill) == 1 and _count(m.handoff) == 1

        prefill, decode = (w.stats() for w in workers)
        assert decode.kv_loads == 1 and decode.kv_load_failures == 0
        assert decode.kv_load_seconds_total > 0
        assert decode.kv_load_bytes_total == 0  # the sim engine hands off blocks without bytes
        assert prefill.kv_loads == 0 and prefill.busy_seconds_total > 0

        registry = CollectorRegistry(auto_describe=False)
        registry.register(m)
        text = generate_latest(registry).decode()
        assert "tandem_router_disagg_prefill_seconds_count 1.0" in text
        assert "tandem_router_disagg_handoff_seconds_count 1.0" in text
        assert "tandem_router_disagg_fallbacks_total 0.0" in text
    finally:
        await backend.close()
        for w in workers:
            await w.stop()


def _count(histogram: object) -> float:
    """The `_count` sample of a label-less prometheus_client Histogram."""
    (family,) = histogram.collect()  # type: ignore[attr-defined]
    return next(s.value for s in family.samples if s.name.endswith("_count"))

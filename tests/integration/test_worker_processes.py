"""Serving path with real `tandem worker` processes on 127.0.0.1 (sim engine, fast speedup).

The test process plays the frontend: it hosts the embedded registry and a RouterBackend, and starts
workers through the same LocalLauncher that `tandem serve` uses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.control.discovery import MemoryDiscovery
from tandem.control.registry import RegistryServer
from tandem.deploy.local import LocalLauncher
from tandem.deploy.spec import DeploymentSpec, PoolSpec
from tandem.protocol.errors import OverloadedError, WorkerLostError
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.protocol.registry import WorkerStats
from tandem.protocol.rpc import StatsCall
from tandem.router.backend import RouterBackend
from tests.outputs import next_output
from tests.sim_model import sim_model_dir

READY_TIMEOUT = 60.0  # generous: a loaded 2-core CI box


@dataclass
class Deployment:
    store: MemoryDiscovery
    backend: RouterBackend
    launcher: LocalLauncher

    def address(self, worker_id: str) -> str:
        (w,) = [w for w in self.store.snapshot() if w.worker_id == worker_id]
        return w.address

    def pid(self, worker_id: str) -> int:
        (c,) = [c for c in self.launcher.children if c.worker_id == worker_id]
        return c.pid

    async def stats(self, worker_id: str) -> WorkerStats:
        reply = await self.backend.pool.call(self.address(worker_id), StatsCall())
        assert isinstance(reply, WorkerStats)
        return reply


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    model = sim_model_dir(tmp_path, context=4096)
    spec = DeploymentSpec(
        model=str(model),
        policy="round-robin",
        pools=(PoolSpec(name="w", replicas=2, engine="sim", speedup=20, engine_args={"num_blocks": 512}),),
    )
    store = MemoryDiscovery()
    registry = RegistryServer(store)
    await registry.start()
    launcher = LocalLauncher(spec, registry.address, log_level="WARNING", drain_timeout=20)
    await launcher.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(store.snapshot()) < 2:
        assert not launcher.exited(), "a worker exited during start-up"
        assert time.monotonic() < deadline, "workers did not register in time"
        await asyncio.sleep(0.1)
    backend = RouterBackend(store, spec.policy)
    yield Deployment(store, backend, launcher)
    await launcher.stop(timeout=10)
    assert not [c for c in launcher.children if c.proc.returncode is None], "orphaned worker"
    await backend.close()
    await registry.close()


def _req(rid: str, n: int) -> GenerateRequest:
    return GenerateRequest(rid, "simmodel", list(range(1, 40)), SamplingSpec(max_tokens=n))


async def _run(backend: RouterBackend, req: GenerateRequest) -> list[int]:
    tokens: list[int] = []
    async for out in backend.generate(req):
        tokens += out.new_token_ids
    return tokens


async def _until(cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not await cond():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_stream_from_two_workers_and_cancel_frees_kv(deployment: Deployment) -> None:
    results = await asyncio.gather(*[_run(deployment.backend, _req(f"r{i}", 16)) for i in range(8)])
    assert all(len(r) == 16 for r in results)
    stats = [await deployment.stats(wid) for wid in ("w-0", "w-1")]
    for s in stats:
        assert s.prompt_tokens_total > 0, f"{s.worker_id} got no request"
    # Where the engines' time went, per request (what a client's latency is compared with).
    assert sum(s.queued_requests_total for s in stats) == 8
    assert sum(s.first_tokens_total for s in stats) == 8
    assert sum(s.decode_tokens_total for s in stats) == 8 * 15
    assert all(s.prefill_seconds_total > 0 and s.decode_seconds_total > 0 for s in stats)

    gen = deployment.backend.generate(_req("long", 100_000))
    await next_output(gen)
    (wid,) = deployment.backend.in_flight.keys()
    assert (await deployment.stats(wid)).load.num_used_blocks > 0
    await gen.aclose()

    async def freed() -> bool:
        s = await deployment.stats(wid)
        return s.load.num_used_blocks == 0 and s.load.active_requests == 0

    await _until(freed, 10, "KV blocks to be freed after cancel")

    # The first token's output brings the engine's own time to it over the request plane (the
    # frontend's per-request timing reads it); later outputs do not repeat it.
    outs = [o async for o in deployment.backend.generate(_req("timed", 4))]
    tokens = [o for o in outs if o.new_token_ids]
    assert tokens[0].engine_ttft_s > 0
    assert all(o.engine_ttft_s == 0 for o in tokens[1:])


async def test_kill_9_mid_stream_raises_worker_lost_and_leaves_registry(deployment: Deployment) -> None:
    gen = deployment.backend.generate(_req("doomed", 100_000))
    await next_output(gen)
    (wid,) = deployment.backend.in_flight.keys()
    os.kill(deployment.pid(wid), signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerLostError):
        async for _ in gen:
            pass
    assert time.monotonic() - started < 5.0

    async def gone() -> bool:
        return wid not in {w.worker_id for w in deployment.store.snapshot()}

    assert await _until(gone, 3.0 + 2.0, "the dead worker to leave the registry") <= 5.0
    # The survivor takes new requests.
    assert len(await _run(deployment.backend, _req("after", 8))) == 8


async def test_sigterm_drains_in_flight_and_routes_new_requests_elsewhere(deployment: Deployment) -> None:
    n = 300  # about a second or more of decode steps at this speedup
    gen = deployment.backend.generate(_req("inflight", n))
    first = await next_output(gen)
    (wid,) = deployment.backend.in_flight.keys()
    other = "w-1" if wid == "w-0" else "w-0"
    os.kill(deployment.pid(wid), signal.SIGTERM)

    async def draining() -> bool:
        return any(w.worker_id == wid and w.status == "draining" for w in deployment.store.snapshot())

    await _until(draining, 5.0, "the worker to report draining")
    before = (await deployment.stats(other)).prompt_tokens_total
    for i in range(3):
        assert len(await _run(deployment.backend, _req(f"new{i}", 4))) == 4
    assert (await deployment.stats(other)).prompt_tokens_total > before

    tokens = list(first.new_token_ids)
    async for out in gen:
        tokens += out.new_token_ids
    assert len(tokens) == n, "the in-flight request must finish on the draining worker"
    (child,) = [c for c in deployment.launcher.children if c.worker_id == wid]
    assert await asyncio.wait_for(child.proc.wait(), 10) == 0

    async def deregistered() -> bool:
        return wid not in {w.worker_id for w in deployment.store.snapshot()}

    await _until(deregistered, 2.0, "the drained worker to deregister")


async def test_no_live_worker_is_overloaded(deployment: Deployment) -> None:
    assert deployment.backend.is_ready("simmodel")
    await deployment.launcher.stop(timeout=10)

    async def empty() -> bool:
        return not deployment.store.snapshot()

    await _until(empty, 5.0, "every worker to deregister")
    assert not deployment.backend.is_ready("simmodel")
    with pytest.raises(OverloadedError):
        await _run(deployment.backend, _req("x", 4))

"""RouterBackend over in-process workers (sim engine, real request plane on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tandem.control.discovery import MemoryDiscovery
from tandem.engine.config import EngineConfig
from tandem.protocol.errors import ModelNotFoundError, OverloadedError
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.protocol.registry import WorkerLoad, WorkerStats
from tandem.protocol.rpc import StatsCall
from tandem.router.backend import RouterBackend
from tandem.router.load_board import LoadBoard
from tandem.worker.worker import Worker, WorkerConfig
from tests.outputs import next_output


async def _start(
    model_dir: Path, discovery: MemoryDiscovery, n: int, load_interval: float = 0.5
) -> list[Worker]:
    workers = []
    for i in range(n):
        cfg = WorkerConfig(
            str(model_dir),
            engine="sim",
            worker_id=f"w{i}",
            speedup=50,
            engine_config=EngineConfig(num_blocks=128),
            load_interval=load_interval,
        )
        w = Worker(cfg, discovery)
        await w.start()
        workers.append(w)
    return workers


def _req(rid: str, n: int = 8, model: str = "simmodel") -> GenerateRequest:
    return GenerateRequest(rid, model, list(range(1, 30)), SamplingSpec(max_tokens=n))


async def _run(backend: RouterBackend, req: GenerateRequest) -> list[int]:
    tokens: list[int] = []
    async for out in backend.generate(req):
        tokens += out.new_token_ids
    return tokens


async def test_streams_and_spreads_across_workers(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2)
    backend = RouterBackend(d, "round-robin")
    assert [c.name for c in backend.models()] == ["simmodel"]
    assert backend.is_ready("simmodel") and not backend.is_ready("other")
    results = await asyncio.gather(*[_run(backend, _req(f"r{i}")) for i in range(10)])
    assert all(len(r) == 8 for r in results)
    steps = Counter({w.worker_id: w.stats().prompt_tokens_total for w in workers})
    assert all(v > 0 for v in steps.values()), steps
    await backend.close()
    for w in workers:
        await w.stop()


async def test_least_loaded_spreads_concurrent_requests(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2)
    backend = RouterBackend(d, "least-loaded")
    picked: Counter[str] = Counter()

    async def one(i: int) -> None:
        async for _ in backend.generate(_req(f"r{i}", n=30)):
            picked.update(backend.in_flight.keys())
            break

    await asyncio.gather(*[one(i) for i in range(6)])
    assert set(picked) == {"w0", "w1"}
    await backend.close()
    for w in workers:
        await w.stop()


async def test_least_loaded_trusts_its_own_count_over_a_stale_report(model_dir: Path) -> None:
    # w0's last report still shows 50 requests (they have since finished; reports are up to a
    # second old). This router has nothing in flight anywhere, so w0 is as free as w1.
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2, load_interval=3600.0)
    assert workers[0].lease is not None
    await workers[0].lease.update(load=WorkerLoad(active_requests=50, num_used_blocks=0))
    backend = RouterBackend(d, "least-loaded")
    first = backend.generate(_req("a", n=10_000))
    await first.__anext__()
    assert set(backend.in_flight) == {"w0"}  # the tie goes to the lowest id, not away from w0
    second = backend.generate(_req("b", n=10_000))
    await second.__anext__()
    assert dict(backend.in_flight) == {"w0": 1, "w1": 1}
    for gen in (first, second):
        await gen.aclose()
    await backend.close()
    for w in workers:
        await w.stop()


async def test_a_request_leaves_the_load_counts_before_its_caller_has_the_end(model_dir: Path) -> None:
    # The frontend stops reading at the finish output and writes the client's last chunk; a closed
    # loop's next request can be routed right after. It must not count the finished one as load.
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2)
    backend = RouterBackend(d, "least-loaded")
    # Long enough that a lagging reader's merged first output cannot hold the finish already.
    gen = backend.generate(_req("a", n=1000))
    out = await next_output(gen)
    assert dict(backend.in_flight) == {"w0": 1}
    while out.finish_reason is None:
        out = await anext(gen)
    assert not backend.in_flight  # the generator has not been asked for more, nor closed
    await gen.aclose()
    # A caller that leaves mid-stream takes the request off the counts as it closes the stream.
    left = backend.generate(_req("b", n=10_000))
    await next_output(left)
    assert list(backend.in_flight.values()) == [1]  # on either worker (the reports' blocks break ties)
    await left.aclose()
    assert not backend.in_flight
    await backend.close()
    for w in workers:
        await w.stop()


async def test_cancel_mid_stream_frees_kv(model_dir: Path) -> None:
    d = MemoryDiscovery()
    (w,) = await _start(model_dir, d, 1)
    backend = RouterBackend(d)
    gen = backend.generate(_req("long", n=100_000))
    await next_output(gen)
    assert w.stats().load.num_used_blocks > 0
    await gen.aclose()
    for _ in range(100):
        stats = await backend.pool.call(w.address, StatsCall())
        assert isinstance(stats, WorkerStats)
        if stats.load.num_used_blocks == 0 and stats.load.active_requests == 0:
            break
        await asyncio.sleep(0.02)
    assert stats.load.num_used_blocks == 0 and stats.num_free_blocks == stats.num_blocks
    await backend.close()
    await w.stop()


async def test_errors_no_worker_unknown_model_and_draining(model_dir: Path) -> None:
    d = MemoryDiscovery()
    backend = RouterBackend(d)
    with pytest.raises(ModelNotFoundError):
        await _run(backend, _req("a"))
    workers = await _start(model_dir, d, 2)
    with pytest.raises(ModelNotFoundError):
        await _run(backend, _req("b", model="nope"))
    # A draining worker is never picked; new requests go to the other one.
    await workers[0].drain(timeout=0)
    for i in range(4):
        await _run(backend, _req(f"c{i}"))
    assert workers[0].stats().prompt_tokens_total == 0 and workers[1].stats().prompt_tokens_total > 0
    await workers[1].drain(timeout=0)
    with pytest.raises(OverloadedError):
        await _run(backend, _req("d"))
    for w in workers:
        await w.stop()
    # Known model, no live worker at all.
    assert not backend.is_ready("simmodel")
    with pytest.raises(OverloadedError):
        await _run(backend, _req("e"))
    await backend.close()


async def test_refusal_before_first_token_retries_elsewhere(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2)
    backend = RouterBackend(d, "round-robin")
    workers[0].draining = True  # refuses, but discovery does not know yet (stale snapshot)
    for i in range(4):
        assert len(await _run(backend, _req(f"r{i}"))) == 8
    await backend.close()
    for w in workers:
        await w.stop()


async def test_workers_register_their_step_budget_and_the_router_passes_it_on(model_dir: Path) -> None:
    # The KV router treats queued prefill that fits in a worker's next step as free
    # (`router/policy.py`); the budget comes from the worker's registration.
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 1)
    backend = RouterBackend(d, "least-loaded")
    (info,) = d.snapshot()
    assert info.max_num_batched_tokens == EngineConfig().max_num_batched_tokens > 0
    (view,) = backend._views([info])
    assert (view.step_tokens, view.capacity_blocks) == (info.max_num_batched_tokens, 128)
    await backend.close()
    for w in workers:
        await w.stop()


async def test_least_loaded_adds_the_other_frontends_counts_from_the_load_board(model_dir: Path) -> None:
    # Two frontends route to the same two workers. The first holds 2 requests on w0 and 1 on w1;
    # alone, the second would send its request to w0 (both look idle to it, the tie goes to the
    # lowest id). With the board it sees 2 and 1, and picks w1.
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2)
    owner, first, second = _two_frontends(d, workers, "least-loaded")
    held = [first.generate(_req(f"a{i}", n=10_000)) for i in range(3)]
    for gen in held:
        await next_output(gen)
    assert dict(first.in_flight) == {"w0": 2, "w1": 1}
    lone = RouterBackend(d, "least-loaded")
    alone = lone.generate(_req("alone", n=10_000))
    await next_output(alone)
    assert dict(lone.in_flight) == {"w0": 1}
    shared = second.generate(_req("b", n=10_000))
    await next_output(shared)
    assert dict(second.in_flight) == {"w1": 1}
    # Requests that end leave the board too.
    for gen in held:
        await gen.aclose()
    assert second.board is not None
    assert second.board.others(["w0", "w1"])[:, 0].tolist() == [0, 0]  # the first's, all ended
    assert owner.others(["w0", "w1"])[:, 0].tolist() == [0, 1]  # the second's
    for gen in (alone, shared):
        await gen.aclose()
    await _close(owner, [first, second, lone], workers)


async def test_kv_routers_of_two_frontends_weigh_each_others_blocks(model_dir: Path) -> None:
    # The KV router counts load in KV blocks and queued prefill tokens; with a board, a second
    # frontend's router adds what the first has on each worker.
    d = MemoryDiscovery()
    workers = await _start(model_dir, d, 2)
    owner, first, second = _two_frontends(d, workers, "kv")

    def long(rid: str, i: int) -> GenerateRequest:  # 200-token prompts with no shared prefix
        return GenerateRequest(rid, "simmodel", [100 * i + k for k in range(1, 200)], SamplingSpec(10_000))

    held = []
    for i in range(3):
        gen = first.generate(long(f"a{i}", i))
        await next_output(gen)
        held.append(gen)
    on = dict(first.in_flight)
    busier = max(on, key=lambda w: on[w])
    assert sorted(on.values()) == [1, 2]
    loads = dict(zip(["w0", "w1"], owner.others(["w0", "w1"]).tolist(), strict=True))
    assert loads == {"w0": [0, 0, 0], "w1": [0, 0, 0]}  # the second has nothing yet
    seen = second.board.others(["w0", "w1"]) if second.board else None
    assert seen is not None and seen[:, 0].tolist() == [on.get("w0", 0), on.get("w1", 0)]
    assert all(blocks > 0 for blocks in seen[:, 1])  # 200-token prompts hold blocks on both
    # Alone, a router sees two idle workers and the tie goes to the busier one; the second does not.
    lone = RouterBackend(d, "kv")
    alone = lone.generate(long("alone", 4))
    await next_output(alone)
    assert list(lone.in_flight) == [busier]
    gen = second.generate(long("b", 3))
    await next_output(gen)
    assert list(second.in_flight) == [w for w in ("w0", "w1") if w != busier]
    for g in [*held, alone, gen]:
        await g.aclose()
    await _close(owner, [first, second, lone], workers)


def _two_frontends(
    d: MemoryDiscovery, workers: list[Worker], policy: str
) -> tuple[LoadBoard, RouterBackend, RouterBackend]:
    """Two frontends' routers over one board: the owner's (row 0) and a second one's (row 1)."""
    owner = LoadBoard.create(2, 16)
    owner.assign(w.worker_id for w in workers)
    first = RouterBackend(d, policy, board=owner)
    second = RouterBackend(d, policy, board=LoadBoard.attach(owner.path, 2, 16, 1))
    return owner, first, second


async def _close(owner: LoadBoard, backends: list[RouterBackend], workers: list[Worker]) -> None:
    for backend in backends:
        await backend.close()
        if backend.board is not None and backend.board is not owner:
            backend.board.close()
    owner.close()
    for w in workers:
        await w.stop()

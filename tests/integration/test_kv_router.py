"""KV-aware routing over the real serving path: 4 in-process sim workers, request plane on 127.0.0.1,
KV events streamed to the router (embedded event plane), dumps on bootstrap and on gaps."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from tandem.control.discovery import MemoryDiscovery
from tandem.engine.config import EngineConfig
from tandem.protocol.errors import OverloadedError
from tandem.protocol.messages import EngineOutput, GenerateRequest, SamplingSpec
from tandem.router.admission import AdmissionQueues
from tandem.router.backend import RouterBackend
from tandem.router.disagg import DisaggPolicy
from tandem.router.kv import KvRouterConfig
from tandem.router.kv_policy import TUNED, KvPolicy
from tandem.router.policy import KvPolicyConfig
from tandem.worker.worker import Worker, WorkerConfig
from tests.outputs import next_output
from tests.sim_model import sim_model_dir

BS = 16


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return sim_model_dir(tmp_path, context=4096)


async def start_workers(model_dir: Path, d: MemoryDiscovery, n: int = 4) -> list[Worker]:
    workers = []
    for i in range(n):
        cfg = WorkerConfig(
            str(model_dir), engine="sim", worker_id=f"w{i}", speedup=100,
            engine_config=EngineConfig(block_size=BS, num_blocks=256), load_interval=0.05,
        )  # fmt: skip
        w = Worker(cfg, d)
        await w.start()
        workers.append(w)
    return workers


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 997 + 1 for i in range(n)]


async def run(backend: RouterBackend, rid: str, prompt: list[int], n: int = 4) -> tuple[int, str]:
    """(cached tokens, worker) of one request."""
    cached = 0
    req = GenerateRequest(rid, "simmodel", prompt, SamplingSpec(max_tokens=n))
    async for out in backend.generate(req):
        cached = max(cached, out.num_cached_tokens)
    policy = backend.policy
    assert isinstance(policy, KvPolicy)
    worker = max(policy.router.metrics.decisions.items(), key=lambda kv: kv[1])[0]
    return cached, worker


async def settle() -> None:
    await asyncio.sleep(0.1)  # let the event streams deliver the last step's events


def last_worker(policy: KvPolicy, before: Counter[str]) -> str:
    diff = policy.router.metrics.decisions - before
    assert sum(diff.values()) == 1
    return next(iter(diff))


async def route_one(backend: RouterBackend, rid: str, prompt: list[int]) -> tuple[int, str]:
    policy = backend.policy
    assert isinstance(policy, KvPolicy)
    before = Counter(policy.router.metrics.decisions)
    cached, _ = await run(backend, rid, prompt)
    await settle()
    return cached, last_worker(policy, before)


async def test_shared_prefix_follows_its_holder_and_unrelated_spread(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await start_workers(model_dir, d)
    backend = RouterBackend(d, "kv")
    system = tokens(1, 40 * BS)  # a long shared prefix (40 blocks)
    results = [await route_one(backend, f"s{i}", system + tokens(100 + i, 3 * BS)) for i in range(6)]
    holder = results[0][1]
    assert all(w == holder for _, w in results), results
    assert results[0][0] == 0 and all(c >= 40 * BS for c, _ in results[1:]), results
    # Unrelated prompts, sent together so each sees the others' load: they spread.
    policy = backend.policy
    assert isinstance(policy, KvPolicy)
    before = Counter(policy.router.metrics.decisions)
    await asyncio.gather(*[run(backend, f"u{i}", tokens(500 + i, 20 * BS), n=30) for i in range(8)])
    spread = policy.router.metrics.decisions - before
    assert len(spread) == 4 and max(spread.values()) <= 3, spread
    assert policy.router.metrics.snapshot()["decision_p99_ms"] < 50
    await backend.close()
    for w in workers:
        await w.stop()


async def test_bootstrap_from_dumps_gap_resync_and_purge(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await start_workers(model_dir, d)
    first = RouterBackend(d, "kv")
    prefix = tokens(2, 30 * BS)
    _, holder = await route_one(first, "a", prefix + tokens(3, BS))
    # A second router (a replica, or a restart) learns the cache from dumps alone.
    second = RouterBackend(d, "kv")
    second.policy.sync(d.snapshot())
    await asyncio.sleep(0.3)
    policy = second.policy
    assert isinstance(policy, KvPolicy)
    assert policy.router.metrics.resyncs == 4
    cached, w = await route_one(second, "b", prefix + tokens(4, BS))
    assert w == holder and cached >= 30 * BS
    # Lose events: the holder's publisher drops every batch for a while; the next batch that gets
    # through shows a gap, and the router resyncs from a dump.
    pub = next(x for x in workers if x.worker_id == holder).publisher
    assert pub is not None
    pub.max_pending = 0
    other = tokens(5, 25 * BS)
    await run(second, "c", other)  # unrelated: lands anywhere; if on the holder, its events are lost
    await run(second, "c2", prefix + tokens(6, 8 * BS))  # on the holder: its new blocks are lost
    pub.max_pending = 1024
    resyncs = policy.router.metrics.resyncs
    await run(second, "d", prefix + tokens(7, 2 * BS))
    await settle()
    assert policy.router.metrics.resyncs > resyncs
    assert not policy.router.indexer.is_stale(holder)
    # A worker that leaves is purged from the index.
    leaving = next(x for x in workers if x.worker_id == holder)
    await leaving.stop()
    await asyncio.sleep(0.1)
    _, w = await route_one(second, "e", prefix + tokens(8, BS))
    assert w != holder and holder not in policy.router.indexer.workers()
    await first.close()
    await second.close()
    for x in workers:
        if x is not leaving:
            await x.stop()


async def test_approximate_mode_follows_its_own_decisions(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await start_workers(model_dir, d)
    backend = RouterBackend(d, "kv-approx")
    prefix = tokens(9, 30 * BS)
    results = [await route_one(backend, f"x{i}", prefix + tokens(10 + i, BS)) for i in range(4)]
    assert len({w for _, w in results}) == 1 and all(c > 0 for c, _ in results[1:]), results
    assert sum(w.publisher.num_subscribers for w in workers if w.publisher) == 0
    await backend.close()
    for w in workers:
        await w.stop()


async def busy_fleet(
    model_dir: Path, n: int, queue: AdmissionQueues | None = None
) -> tuple[list[Worker], RouterBackend, list[AsyncGenerator[EngineOutput, None]]]:
    """n workers behind a KV router with a 20% busy threshold, each made busy by one long request
    (60 blocks of its 256) whose stream is open and has produced its first token."""
    d = MemoryDiscovery()
    workers = await start_workers(model_dir, d, n=n)
    cfg = KvRouterConfig(policy=KvPolicyConfig(**{**TUNED.__dict__, "busy_threshold": 0.2}))
    backend = RouterBackend(d, KvPolicy(cfg), admission=queue)
    streams = [backend.generate(GenerateRequest(f"l{i}", "simmodel", tokens(20 + i, 60 * BS),
                                                SamplingSpec(max_tokens=500))) for i in range(n)]  # fmt: skip
    for s in streams:
        await next_output(s)
    return workers, backend, streams


async def stop(
    workers: list[Worker], backend: RouterBackend, streams: list[AsyncGenerator[EngineOutput, None]]
) -> None:
    for s in streams:
        await s.aclose()
    await backend.close()
    for w in workers:
        await w.stop()


async def test_busy_workers_shed_with_overloaded(model_dir: Path) -> None:
    workers, backend, streams = await busy_fleet(model_dir, 2)
    with pytest.raises(OverloadedError):
        await run(backend, "shed", tokens(30, 4 * BS))
    for s in streams:
        await s.aclose()
    await asyncio.sleep(0.2)  # the inner streams close (and free their load) via the loop's finalizer
    await run(backend, "after", tokens(31, 4 * BS))  # load freed on close: accepted again
    await stop(workers, backend, [])


async def test_busy_workers_queue_requests_until_room_frees(model_dir: Path) -> None:
    queues = AdmissionQueues(max_waiting=1, timeout=10)
    workers, backend, streams = await busy_fleet(model_dir, 2, queues)
    queue = queues.pool("decode")  # aggregated workers generate: the decode pool
    waiter = asyncio.create_task(run(backend, "waits", tokens(30, 4 * BS)))
    await asyncio.sleep(0.3)
    assert not waiter.done() and queue.waiting == 1, "a busy fleet queues the request, no 503"
    with pytest.raises(OverloadedError, match="already waiting"):
        await run(backend, "refused", tokens(31, 4 * BS))  # the queue holds one: refused at once
    await streams[0].aclose()  # room frees on one worker
    await asyncio.wait_for(waiter, 10)
    assert queue.queued_total == 1 and queue.full_total == 1 and queue.waiting == 0
    await stop(workers, backend, streams[1:])


async def test_a_request_that_waits_too_long_gets_overloaded(model_dir: Path) -> None:
    queues = AdmissionQueues(max_waiting=4, timeout=0.3)
    workers, backend, streams = await busy_fleet(model_dir, 1, queues)
    queue = queues.pool("decode")
    with pytest.raises(OverloadedError, match=r"stayed busy for 0\.3 s"):
        await run(backend, "late", tokens(41, 4 * BS))
    assert queue.timeouts_total == 1 and queue.waiting == 0
    await stop(workers, backend, streams)


async def test_disaggregated_pools_queue_separately(model_dir: Path) -> None:
    """A request waiting for a busy decode worker does not hold up the next request's prefill."""
    d = MemoryDiscovery()
    workers = []
    for role in ("prefill", "decode"):
        cfg = WorkerConfig(
            str(model_dir), engine="sim", worker_id=role, role=role, speedup=100,
            engine_config=EngineConfig(block_size=BS, num_blocks=256), load_interval=0.05,
        )  # fmt: skip
        workers.append(Worker(cfg, d))
        await workers[-1].start()
    policy = KvPolicy(KvRouterConfig(policy=KvPolicyConfig(**{**TUNED.__dict__, "busy_threshold": 0.2})))
    queues = AdmissionQueues(max_waiting=4, timeout=10)
    backend = RouterBackend(d, policy, disagg=DisaggPolicy(64), admission=queues)

    def request(rid: str, seed: int, blocks: int, n: int) -> GenerateRequest:
        return GenerateRequest(rid, "simmodel", tokens(seed, blocks * BS), SamplingSpec(max_tokens=n))

    long = backend.generate(request("long", 50, 60, 500))
    await next_output(long)  # the first token, from the prefill worker
    await next_output(long)  # the second, from its decode leg: 60 of the decode worker's 256 blocks, busy
    b = asyncio.create_task(_drain(backend.generate(request("b", 51, 8, 4))))
    await asyncio.sleep(0.3)
    assert queues.pool("decode").waiting == 1 and not b.done(), "b: prefilled, its decode leg waits"
    c = backend.generate(request("c", 52, 8, 4))
    await asyncio.wait_for(next_output(c), 5)  # c's prefill is not held up behind b's decode leg
    rest = asyncio.create_task(_drain(c))
    await asyncio.sleep(0.3)
    assert queues.pool("decode").waiting == 2 and queues.pool("prefill").queued_total == 0
    await long.aclose()
    assert [len(x) for x in await asyncio.wait_for(asyncio.gather(b, rest), 10)] == [4, 3]
    await backend.close()
    for w in workers:
        await w.stop()


async def _drain(stream: AsyncGenerator[EngineOutput, None]) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]

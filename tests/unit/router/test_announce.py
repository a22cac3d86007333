"""A router that picks as the request reaches the frontend (`RouterBackend.announce`): the pick is
counted at once, the worker's engine is told the request is coming, `generate` streams from that
worker, and `withdraw` undoes a pick whose request never got that far."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tandem.control.discovery import MemoryDiscovery
from tandem.engine.config import EngineConfig
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.router.backend import RouterBackend
from tandem.worker.worker import Worker, WorkerConfig
from tests.outputs import next_output


async def _workers(model_dir: Path, d: MemoryDiscovery, n: int = 2) -> list[Worker]:
    workers = []
    for i in range(n):
        config = EngineConfig(num_blocks=128, regroup_expect_steps=4.0)
        w = Worker(WorkerConfig(str(model_dir), engine="sim", worker_id=f"w{i}", engine_config=config), d)
        await w.start()
        workers.append(w)
    return workers


def _req(rid: str, n: int = 4) -> GenerateRequest:
    return GenerateRequest(rid, "simmodel", list(range(1, 30)), SamplingSpec(max_tokens=n))


async def _drain(backend: RouterBackend, req: GenerateRequest) -> int:
    return sum([len(out.new_token_ids) async for out in backend.generate(req)])


def _expected(w: Worker) -> int:
    assert w.engine is not None
    return w.engine.core.scheduler.regroup.num_expected


async def _until(check: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_an_announced_request_is_counted_expected_and_streamed_from_its_worker(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await _workers(model_dir, d)
    backend = RouterBackend(d, "least-loaded")
    # Open the pooled connections (a notice goes only on a live one).
    await asyncio.gather(*[_drain(backend, _req(f"warm{i}", n=50)) for i in range(2)])
    backend.announce("simmodel", "a")
    backend.announce("simmodel", "b")
    assert all(w.takes_announcements for w in d.snapshot())
    assert dict(backend.in_flight) == {"w0": 1, "w1": 1}  # counted at the pick, before generate
    await _until(lambda: _expected(workers[0]) == 1 and _expected(workers[1]) == 1)
    # b was picked for w1; it goes there although both workers now look alike.
    gen = backend.generate(_req("b", n=10_000))
    await next_output(gen)
    assert dict(backend.in_flight) == {"w0": 1, "w1": 1}  # not counted twice
    assert _expected(workers[1]) == 0 and workers[1].stats().load.active_requests == 1
    await gen.aclose()
    assert dict(backend.in_flight) == {"w0": 1}
    backend.withdraw("b")  # done already: nothing changes
    backend.withdraw("a")  # a was refused before it got to generate
    assert not backend.in_flight
    await backend.close()
    for w in workers:
        await w.stop()


async def test_a_worker_gone_since_the_pick_is_replaced_by_another(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await _workers(model_dir, d)
    backend = RouterBackend(d, "least-loaded")
    backend.announce("simmodel", "a")
    assert dict(backend.in_flight) == {"w0": 1}
    await workers[0].stop()
    await _until(lambda: [w.worker_id for w in d.snapshot()] == ["w1"])
    assert await _drain(backend, _req("a")) == 4
    assert not backend.in_flight
    await backend.close()
    await workers[1].stop()


async def test_policies_that_read_the_prompt_do_not_pick_early(model_dir: Path) -> None:
    d = MemoryDiscovery()
    workers = await _workers(model_dir, d)
    backend = RouterBackend(d, "kv")
    backend.announce("simmodel", "a")
    assert not backend.in_flight and not backend._reserved
    assert await _drain(backend, _req("a")) == 4
    backend.announce("nope", "b")  # no worker serves it: nothing to pick
    assert not backend._reserved
    await backend.close()
    for w in workers:
        await w.stop()


async def test_no_notice_goes_to_an_engine_that_ignores_announcements(model_dir: Path) -> None:
    """The default engine drops announcements, so the router does not send them: the pick is still
    counted early, but the worker reads no notice."""
    d = MemoryDiscovery()
    w = Worker(WorkerConfig(str(model_dir), engine="sim", worker_id="w0"), d)
    await w.start()
    assert not d.snapshot()[0].takes_announcements
    backend = RouterBackend(d, "least-loaded")
    await _drain(backend, _req("warm"))  # the pooled connection is open
    sent: list[object] = []
    notify = backend.pool.notify
    backend.pool.notify = lambda address, call: sent.append(call) or notify(address, call)  # type: ignore[method-assign]
    backend.announce("simmodel", "a")
    assert dict(backend.in_flight) == {"w0": 1} and sent == []
    assert await _drain(backend, _req("a")) == 4
    assert not backend.in_flight
    await backend.close()
    await w.stop()

"""Disaggregated serving with real worker processes on 127.0.0.1 (built-in engine, fp32, tiny model).

The test process plays the frontend (embedded registry + RouterBackend); prefill and decode workers
are `tandem worker` processes started by the LocalLauncher that `tandem serve` uses. Greedy output
must be token-identical to one aggregated engine, and no KV block may stay allocated anywhere
after success, a killed prefill worker or a killed decode worker.
"""

from __future__ import annotations

import asyncio
import os
import random
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
from tandem.engine.config import EngineConfig
from tandem.engine.request import SamplingParams
from tandem.llm import LLM
from tandem.models.tiny import write_tiny_model
from tandem.protocol.errors import WorkerLostError
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.protocol.registry import WorkerStats
from tandem.protocol.rpc import StatsCall
from tandem.router.backend import RouterBackend
from tandem.router.disagg import DisaggPolicy
from tests.outputs import next_output

READY_TIMEOUT = 120.0
MAX_TOKENS = 12
ENGINE_ARGS = {"block_size": 16, "num_blocks": 512, "max_num_batched_tokens": 1024}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=11)


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, 500) for _ in range(48)]
    out = []
    for i in range(n):
        body = [rng.randrange(3, 500) for _ in range([9, 23, 70, 140][i % 4])]
        out.append(system + body if i % 2 else body)  # half share a 3-block system prompt
    return out


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    llm = LLM(model_dir, dtype="float32", config=EngineConfig(**ENGINE_ARGS))
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [c.token_ids for c in llm.generate(prompts(), sp)]


@dataclass
class Deployment:
    store: MemoryDiscovery
    backend: RouterBackend
    launcher: LocalLauncher

    def workers(self, role: str) -> list[str]:
        return sorted(w.worker_id for w in self.store.snapshot() if w.role == role)

    def pid(self, worker_id: str) -> int:
        (c,) = [c for c in self.launcher.children if c.worker_id == worker_id]
        return c.pid

    async def stats(self, worker_id: str) -> WorkerStats:
        (w,) = [w for w in self.store.snapshot() if w.worker_id == worker_id]
        reply = await self.backend.pool.call(w.address, StatsCall())
        assert isinstance(reply, WorkerStats)
        return reply

    async def assert_no_blocks_in_use(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            used = {
                w.worker_id: (await self.stats(w.worker_id)).load.num_used_blocks
                for w in self.store.snapshot()
            }
            if not any(used.values()):
                return
            assert time.monotonic() < deadline, f"KV blocks still allocated: {used}"
            await asyncio.sleep(0.2)


async def start(model_dir: Path, prefill: int, decode: int, hold_timeout: float = 120.0) -> Deployment:
    pools = (
        PoolSpec(name="p", role="prefill", replicas=prefill, dtype="float32", engine_args=ENGINE_ARGS,
                 kv_hold_timeout=hold_timeout),
        PoolSpec(name="d", role="decode", replicas=decode, dtype="float32", engine_args=ENGINE_ARGS),
    )  # fmt: skip
    spec = DeploymentSpec(model=str(model_dir), policy="round-robin", pools=pools)
    store = MemoryDiscovery()
    registry = RegistryServer(store)
    await registry.start()
    launcher = LocalLauncher(spec, registry.address, log_level="WARNING", drain_timeout=10)
    await launcher.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(store.snapshot()) < prefill + decode:
        assert not launcher.exited(), "a worker exited during start-up"
        assert time.monotonic() < deadline, "workers did not register in time"
        await asyncio.sleep(0.1)
    backend = RouterBackend(store, "round-robin", disagg=DisaggPolicy(min_remote_prompt_tokens=0))
    backend._registry = registry  # type: ignore[attr-defined]  # closed in stop()
    return Deployment(store, backend, launcher)


async def stop(d: Deployment) -> None:
    await d.launcher.stop(timeout=10)
    await d.backend.close()
    await d.backend._registry.close()  # type: ignore[attr-defined]
    assert not [c for c in d.launcher.children if c.proc.returncode is None], "orphaned worker"


def request(i: int, prompt: list[int]) -> GenerateRequest:
    return GenerateRequest(f"r{i}", "tiny", prompt, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0))


async def collect(stream: AsyncIterator) -> tuple[list[int], int]:
    tokens: list[int] = []
    cached = 0
    async for out in stream:
        tokens += out.new_token_ids
        cached = out.num_cached_tokens
    return tokens, cached


@pytest.mark.parametrize(
    ("n_prefill", "n_decode"), [(1, 1), pytest.param(2, 2, marks=pytest.mark.slow)], ids=["1P1D", "2P2D"]
)
async def test_disaggregated_greedy_matches_aggregated(model_dir, expected, n_prefill, n_decode) -> None:
    d = await start(model_dir, n_prefill, n_decode)
    try:
        ps = prompts()
        # Sequential first pass (prefix caching on the prefill side), then all 16 at once.
        first = [await collect(d.backend.generate(request(i, p))) for i, p in enumerate(ps)]
        assert [t for t, _ in first] == expected
        assert any(c > 0 for _, c in first[2:]), "prompts sharing the system prompt hit the prefill cache"
        again = await asyncio.gather(
            *[collect(d.backend.generate(request(100 + i, p))) for i, p in enumerate(ps)]
        )
        assert [t for t, _ in again] == expected
        for wid in d.workers("prefill"):
            assert (await d.stats(wid)).prompt_tokens_total > 0, f"{wid} prefilled nothing"
        for wid in d.workers("decode"):
            # On a decode worker, prompt tokens loaded from a peer count as cached.
            s = await d.stats(wid)
            assert s.cached_tokens_total > 0.9 * s.prompt_tokens_total > 0, f"{wid} did not load KV"
        await d.assert_no_blocks_in_use()
    finally:
        await stop(d)


async def test_killed_prefill_worker_does_not_lose_the_request(model_dir, expected) -> None:
    d = await start(model_dir, 1, 1)
    try:
        ps = prompts()
        (prefill,) = d.workers("prefill")
        # Killed after handing over the first token, before the decode side pulled the KV: the
        # decode worker's load fails and it computes the prompt itself.
        stream = d.backend.generate(request(0, ps[3]))
        tokens = list((await next_output(stream)).new_token_ids)
        os.kill(d.pid(prefill), signal.SIGKILL)
        rest, _ = await asyncio.wait_for(collect(stream), 30)
        assert tokens + rest == expected[3]
        # With the prefill worker dead (still registered until its lease ends), new requests
        # fall back to local prefill on the decode worker.
        tokens, _ = await asyncio.wait_for(collect(d.backend.generate(request(1, ps[5]))), 30)
        assert tokens == expected[5]
        (decode,) = d.workers("decode")
        deadline = time.monotonic() + 10
        while (await d.stats(decode)).load.num_used_blocks:
            assert time.monotonic() < deadline, "decode worker leaked blocks"
            await asyncio.sleep(0.2)
    finally:
        await stop(d)


async def test_killed_decode_worker_fails_cleanly_and_prefill_frees_its_blocks(model_dir) -> None:
    d = await start(model_dir, 1, 1, hold_timeout=2.0)
    try:
        (decode,) = d.workers("decode")
        (prefill,) = d.workers("prefill")
        long = request(0, prompts()[3])
        long.sampling.max_tokens = 100_000
        long.sampling.ignore_eos = True
        stream = d.backend.generate(long)
        await next_output(stream)  # first token from the prefill worker
        await next_output(stream)  # decoding has started
        os.kill(d.pid(decode), signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerLostError):
            await asyncio.wait_for(collect(stream), 20)
        assert time.monotonic() - started < 10, "the client must hear of the death promptly"
        deadline = time.monotonic() + 10
        while (await d.stats(prefill)).load.num_used_blocks:
            assert time.monotonic() < deadline, "prefill worker leaked blocks"
            await asyncio.sleep(0.2)
    finally:
        await stop(d)


async def test_client_leaving_at_any_point_frees_every_block(model_dir) -> None:
    d = await start(model_dir, 1, 1)  # default 120 s hold timeout: frees must not rely on it
    try:
        long = request(0, prompts()[3])
        long.sampling.max_tokens = 100_000
        long.sampling.ignore_eos = True
        # Left after the first token, before the decode worker pulled the KV.
        stream = d.backend.generate(long)
        await next_output(stream)
        await stream.aclose()
        await d.assert_no_blocks_in_use(timeout=5)
        # Left mid-decode.
        long.request_id = "r1"
        stream = d.backend.generate(long)
        for _ in range(5):
            await next_output(stream)
        await stream.aclose()
        await d.assert_no_blocks_in_use(timeout=5)
    finally:
        await stop(d)

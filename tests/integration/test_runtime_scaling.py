"""Independent scaling at run time: workers join and leave a running disaggregated `tandem serve`.

A decode worker started by hand (`tandem worker --registry ...`) starts taking requests within
seconds; SIGTERM drains it (in-flight requests finish, new ones go elsewhere) and it exits 0. A
client load runs throughout and must see no error and no short answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tandem.control.rpc_client import RpcClientPool
from tandem.models.tiny import write_tiny_model
from tandem.protocol.registry import WorkerStats
from tandem.protocol.rpc import StatsCall
from tests.integration.servers import free_port

MAX_TOKENS = 24


def wait_line(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            assert proc.poll() is None, f"process exited with {proc.returncode}"
            continue
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s")


def drain_output(proc: subprocess.Popen) -> None:
    """Keep reading a child's output so a full pipe never blocks it."""
    assert proc.stdout is not None
    threading.Thread(target=proc.stdout.read, daemon=True).start()


async def stats(pool: RpcClientPool, address: str) -> WorkerStats:
    reply = await pool.call(address, StatsCall())
    assert isinstance(reply, WorkerStats)
    return reply


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=1)


async def test_decode_worker_joins_and_leaves_without_losing_requests(model_dir: Path) -> None:
    port, registry_port = free_port(), free_port()
    cli = [sys.executable, "-m", "tandem.cli.main", "--log-level", "WARNING"]
    serve = subprocess.Popen(
        [*cli, "serve", "--model", str(model_dir), "--engine", "sim", "--speedup", "5",
         "--prefill-workers", "1", "--decode-workers", "1", "--router", "least-loaded",
         "--disagg-min-prompt-tokens", "0", "--port", str(port), "--registry-port", str(registry_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    extra: subprocess.Popen | None = None
    pool = RpcClientPool()
    try:
        wait_line(serve, r"Tandem ready", 120)
        drain_output(serve)
        url = f"http://127.0.0.1:{port}/v1/completions"
        stop = asyncio.Event()
        done: list[int] = []
        errors: list[str] = []

        async def client(i: int) -> None:
            rng = random.Random(i)
            async with httpx.AsyncClient(timeout=60) as http:
                while not stop.is_set():
                    prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(40, 120))]
                    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}
                    r = await http.post(url, json=body)
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    done.append(r.json()["usage"]["completion_tokens"])

        load = [asyncio.create_task(client(i)) for i in range(6)]
        await asyncio.sleep(2)

        extra = subprocess.Popen(
            [*cli, "worker", "--model", str(model_dir), "--engine", "sim", "--speedup", "5",
             "--role", "decode", "--registry", f"127.0.0.1:{registry_port}", "--worker-id", "decode-extra"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        address = wait_line(extra, r"ready on (\S+)", 60).group(1)
        drain_output(extra)
        joined = time.monotonic()
        while (await stats(pool, address)).prompt_tokens_total == 0:
            assert time.monotonic() - joined < 10, "the new decode worker got no request"
            await asyncio.sleep(0.05)
        first_request_s = time.monotonic() - joined
        print(f"new decode worker took its first request {first_request_s * 1000:.0f} ms after joining")

        before = len(done)
        extra.send_signal(signal.SIGTERM)
        assert extra.wait(30) == 0, "a drained worker exits 0"
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*load)
        assert not errors, errors[:3]
        assert len(done) > before, "requests kept completing after the worker left"
        assert set(done) == {MAX_TOKENS}, "every answer is complete"
    finally:
        await pool.close()
        for p in (extra, serve):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)

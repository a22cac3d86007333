"""`tandem serve --frontends 2`: two frontend processes on one port, real sockets and processes.

What a user checks: connections land on both processes; least-loaded stays balanced over the
whole deployment (each process adds the other's in-flight counts); /metrics from either process
counts both; a frontend that dies leaves the deployment serving and is started again; SIGTERM lets
the open streams of both processes finish, then everything exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.models.tiny import write_tiny_model
from tests.integration.servers import free_port
from tests.integration.test_serve import _alive, _stop, _wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    write_tiny_model(out)
    return out


class Streams:
    """Streaming completions, each on a connection of its own (so the kernel picks a process)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.clients: list[httpx.AsyncClient] = []
        self.responses: list[httpx.Response] = []
        # Each stream's line iterator is kept and read on: one dropped half-way is finalized by
        # the garbage collector, which closes its connection (the server then cancels it).
        self.lines: list[AsyncIterator[str]] = []

    async def open(self, max_tokens: int) -> None:
        """Open one stream and wait for its first token: it has been routed and counted."""
        client = httpx.AsyncClient(timeout=60)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "stream": True}
        request = client.build_request("POST", f"{self.base}/v1/completions", json=body)
        response = await client.send(request, stream=True)
        assert response.status_code == 200
        lines = response.aiter_lines()
        while not (await anext(lines)).startswith("data: "):
            pass
        self.clients.append(client)
        self.responses.append(response)
        self.lines.append(lines)

    async def finish(self) -> list[int]:
        """Read every stream to its end: the number of events each carried after the first."""

        async def rest(lines: AsyncIterator[str]) -> int:
            events = 0
            async for line in lines:
                if line.startswith("data: "):
                    events += 1
                    if line == "data: [DONE]":
                        break
            return events

        counts = await asyncio.gather(*(rest(lines) for lines in self.lines))
        await self.close()
        return list(counts)

    async def close(self) -> None:
        for r in self.responses:
            await r.aclose()
        for c in self.clients:
            await c.aclose()
        self.clients, self.responses, self.lines = [], [], []


def _samples(body: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(body) for s in family.samples
    ]


def test_two_frontend_processes_share_the_port_the_load_and_the_metrics(
    tiny_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", "INFO", "serve", "--frontends", "2"]
    cmd += ["--model", str(tiny_model), "--engine", "sim", "--workers", "2", "--speedup", "1"]
    cmd += ["--port", str(port), "--router", "least-loaded", "--log-dir", str(tmp_path / "logs")]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    children: list[int] = []
    try:
        base = _wait_ready(proc, port, "(2 workers, 2 frontend processes)")
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()]
        argv = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children}
        frontends = [pid for pid, a in argv.items() if b"frontend" in a]
        assert len(children) == 3 and len(frontends) == 1, argv

        async def balanced_and_counted() -> None:
            # 16 long streams opened one after another, each on a new connection: both processes
            # get some (all on one: odds 1 in 2^15), and the workers end up with 8 each.
            streams = Streams(base)
            for _ in range(16):
                await streams.open(max_tokens=3000)
            for _ in range(4):  # every scrape, whichever process answers it, counts both
                async with httpx.AsyncClient(timeout=10) as client:
                    body = (await client.get(f"{base}/metrics")).text
                samples = _samples(body)
                active = {
                    labels["worker"]: value
                    for name, labels, value in samples
                    if name == "tandem_worker_active_requests"
                }
                assert active == {"worker-0": 8.0, "worker-1": 8.0}
                inflight = {
                    labels["frontend"]: value
                    for name, labels, value in samples
                    if name == "tandem_frontend_inflight_requests"
                }
                assert set(inflight) == {"0", "1"} and sum(inflight.values()) == 16
                assert all(v > 0 for v in inflight.values()), inflight
            await streams.close()

        asyncio.run(balanced_and_counted())

        # A frontend process that dies: the deployment keeps serving, and it is started again.
        os.kill(frontends[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "frontend-1 restarted" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline, "the frontend's death was not handled"
            time.sleep(0.1)
        for _ in range(6):
            with httpx.Client(timeout=30) as client:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
                r = client.post(f"{base}/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()]
        assert frontends[0] not in children and len(children) == 3
        deadline = time.monotonic() + 60
        while True:  # the new frontend-1 serves (it shows in the merged metrics once ready)
            with httpx.Client(timeout=10) as client:
                body = client.get(f"{base}/metrics").text
            if 'tandem_frontend_inflight_requests{frontend="1"}' in body:
                break
            assert time.monotonic() < deadline, "frontend-1 did not come back"
            time.sleep(0.5)
    finally:
        _stop(proc, 60)
        log.close()
    assert proc.returncode == 0
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in children), "orphaned processes"


def test_sigterm_lets_both_frontends_finish_their_streams(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", "WARNING", "serve", "--frontends", "2"]
    cmd += ["--model", str(tiny_model), "--engine", "sim", "--workers", "2", "--speedup", "5"]
    cmd += ["--port", str(port), "--router", "least-loaded"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        base = _wait_ready(proc, port, "(2 workers, 2 frontend processes)")

        async def drain() -> list[int]:
            streams = Streams(base)
            for _ in range(10):
                await streams.open(max_tokens=300)
            proc.send_signal(signal.SIGTERM)
            return await streams.finish()

        events = asyncio.run(drain())
        # Every stream got its other 299 tokens and [DONE].
        assert events == [300] * 10, events
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""`tandem serve` end to end: frontend + registry + 2 sim workers as real processes, OpenAI HTTP API,
graceful SIGTERM (an in-flight stream completes, every child exits)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.models.tiny import write_tiny_model
from tests.integration.servers import free_port

READY_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    write_tiny_model(out)
    return out


def test_serve_streams_and_drains_on_sigterm(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", "WARNING", "serve"]
    cmd += ["--model", str(tiny_model), "--engine", "sim", "--workers", "2", "--speedup", "20"]
    cmd += ["--port", str(port), "--router", "least-loaded", "--log-dir", str(tmp_path / "logs")]
    cmd += ["--frontends", "1"]  # its children are the 2 workers (several frontends: test_serve_frontends)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        base = _wait_ready(proc, port, "(2 workers)")
        pgrep = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        workers = [int(p) for p in pgrep.stdout.split()]
        assert len(workers) == 2
        assert httpx.get(f"{base}/health").status_code == 200
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny"]
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        _check_worker_metrics(httpx.get(f"{base}/metrics").text, r.json()["usage"]["prompt_tokens"])
        _check_bench_engine_share(base, tiny_model, tmp_path / "bench.json")

        # SIGTERM while a long stream is in flight: it must finish, then everything exits.
        long_body = {"model": "tiny", "prompt": "hi", "max_tokens": 200, "stream": True}
        events = 0
        with httpx.stream("POST", f"{base}/v1/completions", json=long_body, timeout=60) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if events == 2:
                    proc.send_signal(signal.SIGTERM)
                if line == "data: [DONE]":
                    break
        assert line == "data: [DONE]" and events >= 200
        assert proc.wait(timeout=60) == 0
        assert (tmp_path / "logs" / "worker-0.log").read_text().count("ready on") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "orphaned worker processes"


def _check_worker_metrics(body: str, prompt_tokens: int) -> None:
    """The frontend's /metrics carries each worker's engine series, read from the worker processes:
    one request seen by the engines (queued once, one first token, 4 gaps for 5 tokens)."""
    totals: dict[str, float] = {}
    up = []
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith("tandem_worker_"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                if sample.name == "tandem_worker_up":
                    up.append((sample.labels["worker"], sample.labels["role"], sample.value))
    assert sorted(up) == [("worker-0", "agg", 1.0), ("worker-1", "agg", 1.0)]
    assert totals["tandem_worker_request_queue_seconds_count"] == 1
    assert totals["tandem_worker_request_prefill_seconds_count"] == 1
    assert totals["tandem_worker_inter_token_latency_seconds_count"] == 4
    assert totals["tandem_worker_prompt_tokens_total"] == prompt_tokens
    assert totals["tandem_worker_active_requests"] == 0


def _check_bench_engine_share(base: str, model: Path, out: Path) -> None:
    """`tandem bench` splits the client's latency into the engines' share and the serving path's,
    from the server's /metrics before and after the measured requests (the warmup excluded)."""
    cmd = [sys.executable, "-m", "tandem.cli.main", "bench", "--url", base, "--model", "tiny"]
    cmd += ["--tokenizer", str(model), "--concurrency", "4", "--requests", "24", "--warmup", "4"]
    cmd += ["--isl", "24", "--osl", "6", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "added by the serving path" in done.stdout
    engine = json.loads(out.read_text())["engine"]
    assert engine["counts"] == {"queue": 24, "prefill": 24, "itl": 24 * 5}
    # The engine's part of a request is inside what the client saw, so the rest is positive.
    assert 0 < engine["ttft_ms"] and engine["added_ttft_ms"] > 0
    assert engine["ttft_ms"] == pytest.approx(engine["queue_ms"] + engine["prefill_ms"], abs=0.01)
    assert engine["itl_ms"] > 0 and engine["added_itl_ms"] is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_busy_limit_queues_then_sheds_with_503(tiny_model: Path, tmp_path: Path) -> None:
    """`--router kv` with a busy limit and a wait queue of 2: of 8 concurrent long requests on 2
    workers, 2 run, 2 wait for room and then run, 4 get an OpenAI-shaped 503 with Retry-After."""
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", "WARNING", "serve"]
    cmd += ["--model", str(tiny_model), "--engine", "sim", "--workers", "2", "--speedup", "1"]
    cmd += ["--port", str(port), "--router", "kv", "--block-size", "16", "--num-blocks", "64"]
    # One 200-token prompt (13 blocks of 64) puts a worker past 10% of its KV: busy.
    cmd += ["--router-busy-threshold", "0.1", "--router-queue-size", "2", "--router-queue-timeout", "30"]
    # One frontend: the wait queue is each frontend process's own, and the counts below are one queue's.
    cmd += ["--log-dir", str(tmp_path / "logs"), "--frontends", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        base = _wait_ready(proc, port)

        async def one(i: int) -> httpx.Response:
            body = {
                "model": "tiny",
                "prompt": [(i * 37 + k) % 400 + 1 for k in range(200)],
                "max_tokens": 300,  # ~1.8 s each: the burst is all in before any ends
            }
            async with httpx.AsyncClient(timeout=60) as client:
                return await client.post(f"{base}/v1/completions", json=body)

        async def burst() -> list[httpx.Response]:
            return await asyncio.gather(*(one(i) for i in range(8)))

        responses = asyncio.run(burst())
        ok = [r for r in responses if r.status_code == 200]
        shed = [r for r in responses if r.status_code == 503]
        assert len(ok) == 4 and len(shed) == 4, [r.status_code for r in responses]
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in ok)
        for r in shed:
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["code"] == "overloaded" and "already waiting" in err["message"]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'tandem_router_queue_waited_total{pool="decode"} 2.0' in metrics
        assert 'tandem_router_queue_full_total{pool="decode"} 4.0' in metrics
        assert 'tandem_router_queue_waiting{pool="decode"} 0.0' in metrics

        # A client that gives up while its request waits leaves the queue; nothing reaches a worker.
        async def give_up() -> str:
            long = [asyncio.create_task(one(10 + i)) for i in range(2)]  # both workers busy again
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(timeout=0.5) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "hi"})
                await asyncio.sleep(0.2)
                waiting = (await client.get(f"{base}/metrics")).text
            assert all(r.status_code == 200 for r in await asyncio.gather(*long))
            return waiting

        metrics = asyncio.run(give_up())
        assert (
            'tandem_router_queue_waiting{pool="decode"} 0.0' in metrics
            and 'tandem_router_queue_waited_total{pool="decode"} 3.0' in metrics
        )
        decisions = [
            line for line in metrics.splitlines() if line.startswith("tandem_router_decisions_total")
        ]
        assert sum(float(line.split()[-1]) for line in decisions) == 6.0, decisions  # 4 + 2: not the 3rd
    finally:
        _stop(proc, 30)


def _stop(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM `tandem serve` (it drains), and kill it if it is still up after `timeout` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(proc: subprocess.Popen[str], port: int, detail: str = "") -> str:
    """The base URL once `tandem serve` prints its readiness line (`detail` must follow the URL)."""
    out = proc.stdout
    assert out is not None
    ready_line: list[str] = []
    reader = threading.Thread(target=lambda: ready_line.append(out.readline()), daemon=True)
    reader.start()
    reader.join(READY_TIMEOUT)
    assert ready_line and ready_line[0].startswith(f"Tandem ready: http://127.0.0.1:{port}/v1 {detail}")
    return f"http://127.0.0.1:{port}"

"""`tandem serve` end to end: frontend + registry + 2 sim workers as real processes, OpenAI HTTP API,
graceful SIGTERM (an in-flight stream completes, every child exits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        out = proc.stdout
        assert out is not None
        ready_line: list[str] = []
        reader = threading.Thread(target=lambda: ready_line.append(out.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT)
        assert ready_line and ready_line[0].startswith(
            f"Tandem ready: http://127.0.0.1:{port}/v1 (2 workers)"
        )
        base = f"http://127.0.0.1:{port}"
        pgrep = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        workers = [int(p) for p in pgrep.stdout.split()]
        assert len(workers) == 2
        assert httpx.get(f"{base}/health").status_code == 200
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny"]
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

"""`tandem serve` as a benchmark's child process: started, ready, stopped by SIGTERM; and the CPU
time a child has used."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[subprocess.Popen[str]]:
    """Run `cmd` (a `tandem serve` command line) until its "Tandem ready" line, then the body with
    the process (the frontend); stop it (SIGTERM, then kill after 60 s) however the body ends."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        ready: list[str] = []
        out = proc.stdout
        assert out is not None
        reader = threading.Thread(target=lambda: ready.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not ready or not ready[0].startswith("Tandem ready"):
            raise RuntimeError(f"tandem serve did not start: {ready}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

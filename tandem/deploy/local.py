"""Local launcher: runs a deployment's workers as `tandem worker` child processes on this machine.

Each child gets a stable id (<pool>-<index>), joins the registry at `registry_address`, and picks its
own free port (the registry tells the router where it is). Output goes to <log_dir>/<id>.log, or to
our stderr with an "[<id>] " prefix on every line. Children run in their own session, so a Ctrl-C
reaches only the parent, which then stops them in order; on Linux they also get SIGKILL if the parent
dies without stopping them (no orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tandem.deploy.spec import DeploymentSpec

log = logging.getLogger(__name__)


@dataclass
class ChildProcess:
    worker_id: str
    proc: asyncio.subprocess.Process
    command: list[str] = field(default_factory=list)
    log_file: IO[bytes] | None = None
    forwarder: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid


class LocalLauncher:
    def __init__(
        self,
        spec: DeploymentSpec,
        registry_address: str,
        *,
        log_dir: str | Path | None = None,
        log_level: str = "INFO",
        drain_timeout: float = 30.0,
    ) -> None:
        self.spec = spec
        self.registry_address = registry_address
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_level = log_level
        self.drain_timeout = drain_timeout
        self.children: list[ChildProcess] = []

    def worker_command(self, worker_id: str, pool_args: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", self.log_level, "worker"]
        cmd += ["--model", self.spec.model, "--registry", self.registry_address, "--worker-id", worker_id]
        cmd += ["--drain-timeout", str(self.drain_timeout)]
        if self.spec.served_name:
            cmd += ["--served-model-name", self.spec.served_name]
        return cmd + pool_args

    async def start(self) -> None:
        """Spawn every replica of every pool (they register themselves when ready)."""
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for pool in self.spec.pools:
            for i in range(pool.replicas):
                cpus = {pool.cpus[i % len(pool.cpus)]} if pool.cpus else None
                await self.spawn(f"{pool.name}-{i}", pool.worker_args(), cpus)

    async def spawn(self, worker_id: str, pool_args: list[str], cpus: set[int] | None = None) -> ChildProcess:
        return await self.spawn_command(worker_id, self.worker_command(worker_id, pool_args), cpus)

    async def spawn_command(
        self, worker_id: str, cmd: list[str], cpus: set[int] | None = None
    ) -> ChildProcess:
        """Start `cmd` as a child named `worker_id` (a worker, or another frontend process)."""
        log_file = None
        if self.log_dir is not None:
            log_file = open(self.log_dir / f"{worker_id}.log", "ab")
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file or asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=functools.partial(_child_setup, cpus),
        )
        child = ChildProcess(worker_id, proc, cmd, log_file)
        if log_file is None:
            child.forwarder = asyncio.create_task(_forward(worker_id, proc), name=f"log-{worker_id}")
        self.children.append(child)
        log.info("started %s (pid %d)", worker_id, proc.pid)
        return child

    def exited(self) -> list[ChildProcess]:
        """Children that have exited (returncode set)."""
        return [c for c in self.children if c.proc.returncode is not None]

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every child (each drains), wait up to `timeout`, then SIGKILL what is left."""
        timeout = self.drain_timeout + 5.0 if timeout is None else timeout
        live = [c for c in self.children if c.proc.returncode is None]
        for c in live:
            _signal(c, signal.SIGTERM)
        if live:
            await asyncio.wait([asyncio.create_task(c.proc.wait()) for c in live], timeout=timeout)
            for c in live:
                if c.proc.returncode is None:
                    log.warning(
                        "worker %s (pid %d) still up after %.0f s: killing", c.worker_id, c.pid, timeout
                    )
                    _signal(c, signal.SIGKILL)
            for c in live:
                await c.proc.wait()
        for c in self.children:
            if c.forwarder is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(c.forwarder, 2.0)
            if c.log_file is not None:
                c.log_file.close()
        log.info("all %d child processes stopped", len(self.children))


def _signal(child: ChildProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.proc.send_signal(sig)


async def _forward(worker_id: str, proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    prefix = f"[{worker_id}] ".encode()
    out = sys.stderr.buffer
    async for line in proc.stdout:
        out.write(prefix + line)
        out.flush()


def _child_setup(cpus: set[int] | None) -> None:
    """Runs in the child before exec: die with the parent; pin to `cpus` if given."""
    _die_with_parent()
    if cpus:
        os.sched_setaffinity(0, cpus)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. Linux only; elsewhere stop() is the only guarantee.
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

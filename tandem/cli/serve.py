"""`tandem serve`: one frontend process (HTTP app + embedded registry + router) and its workers.

    tandem serve --model DIR --workers 2 --engine sim --router least-loaded --port 8000
    tandem serve -f examples/agg.yaml

This process hosts the registry on a free 127.0.0.1 port, starts every worker as a `tandem worker`
child that registers there, and serves the OpenAI API with a `RouterBackend` over the registry. It
prints "Tandem ready: http://HOST:PORT/v1 (N workers)" once every worker is registered and /health
answers 200. Ctrl-C / SIGTERM: workers drain (in-flight requests finish), then everything stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

from tandem.cli.router_args import add_kv_policy_args, add_queue_args, kv_policy_from_args
from tandem.engines.factory import ENGINES

if TYPE_CHECKING:
    from tandem.control.discovery import MemoryDiscovery
    from tandem.deploy.local import LocalLauncher
    from tandem.deploy.spec import DeploymentSpec
    from tandem.router.load_board import LoadBoard

log = logging.getLogger(__name__)
FRONTEND = "frontend-"
"""Name prefix of the other frontend processes among the launcher's children (frontend-1, ...)."""
RESTARTS = 3
RESTART_WINDOW = 60.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model: frontend, router and worker processes")
    p.add_argument("-f", "--file", default=None, help="deployment YAML (flags below then ignored)")
    p.add_argument("--model", default=None, help="checkpoint folder")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--frontends",
        type=int,
        default=None,
        help="HTTP frontend processes sharing the port (each parses, tokenizes, routes and streams); "
        "default 2 on a machine with 2+ CPUs, else 1",
    )
    p.add_argument("--workers", type=int, default=1, help="aggregated workers (prefill and decode)")
    p.add_argument("--prefill-workers", type=int, default=0, help="disaggregated: prefill workers")
    p.add_argument("--decode-workers", type=int, default=0, help="disaggregated: decode workers")
    p.add_argument(
        "--disagg-min-prompt-tokens",
        type=int,
        default=64,
        help="shorter prompts prefill on the decode worker (conditional disaggregation)",
    )
    p.add_argument(
        "--enforce-disagg", action="store_true", help="refuse instead of prefilling on decode workers"
    )
    p.add_argument("--engine", choices=ENGINES, default="builtin")
    p.add_argument(
        "--router", default="round-robin", help="round-robin | random | least-loaded | kv | kv-approx"
    )
    add_kv_policy_args(p)
    add_queue_args(p)
    p.add_argument("--speedup", type=float, default=1.0, help="sim engine: faster than modelled time")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="workers: longest prompt + output")
    p.add_argument(
        "--scheduler-delay-factor",
        type=float,
        default=None,
        help="workers: while decoding, batch new prompts into one prefill step (vLLM's knob)",
    )
    p.add_argument(
        "--regroup-steps",
        type=float,
        default=None,
        help="workers: when idle, hold new prompts so a batch that ended together prefills together "
        "(at most this many decode-step times; default 2, 0: off)",
    )
    p.add_argument(
        "--regroup-window-steps",
        type=float,
        default=None,
        help="workers: finishes this many decode-step times before a new prompt count for the "
        "regroup hold (default 2)",
    )
    p.add_argument(
        "--regroup-expect-steps",
        type=float,
        default=None,
        help="workers: hold up to this many decode-step times for prompts the router announced, "
        "when they complete a turnover (default 0: off)",
    )
    p.add_argument(
        "--regroup-pace-steps",
        type=float,
        default=None,
        help="workers: let the regroup hold run up to this many decode-step times while the rest of "
        "a turnover is due by then at the pace its prompts came (default 4)",
    )
    p.add_argument(
        "--registry-port",
        type=int,
        default=0,
        help="embedded registry port for `tandem worker` to join (0: any)",
    )
    p.add_argument("--log-dir", default=None, help="worker logs as files here (default: prefixed stderr)")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for workers")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> DeploymentSpec:
    from tandem.deploy.spec import ENGINE_ARGS, DeploymentSpec, PoolSpec, default_frontends

    if args.file:
        return DeploymentSpec.from_yaml(args.file)
    if not args.model:
        raise ValueError("give --model DIR or -f DEPLOYMENT.yaml")
    engine_args = {k: getattr(args, k) for k in ENGINE_ARGS if getattr(args, k, None) is not None}

    def pool(name: str, role: str, replicas: int) -> PoolSpec:
        return PoolSpec(
            name=name,
            role=role,
            replicas=replicas,
            engine=args.engine,
            speedup=args.speedup,
            dtype=args.dtype,
            device=args.device,
            engine_args=engine_args,
        )

    pools: tuple[PoolSpec, ...]
    if args.prefill_workers or args.decode_workers:
        pools = (
            pool("prefill", "prefill", args.prefill_workers),
            pool("decode", "decode", args.decode_workers),
        )
    else:
        pools = (pool("worker", "agg", args.workers),)
    return DeploymentSpec(
        model=args.model,
        served_name=args.served_model_name,
        host=args.host,
        port=args.port,
        policy=args.router,
        pools=pools,
        disagg_min_prompt_tokens=args.disagg_min_prompt_tokens,
        enforce_disagg=args.enforce_disagg,
        kv_policy=kv_policy_from_args(args),
        queue_size=args.router_queue_size,
        queue_timeout=args.router_queue_timeout,
        frontends=default_frontends() if args.frontends is None else args.frontends,
    )


def run(args: argparse.Namespace) -> int:
    from tandem.cli.worker import run_event_loop

    try:
        spec = spec_from_args(args)
    except ValueError as e:
        print(f"tandem serve: {e}", file=sys.stderr)
        return 2
    return run_event_loop(
        serve(spec, args.log_dir, args.log_level, args.drain_timeout, args.ready_timeout, args.registry_port)
    )


async def serve(
    spec: DeploymentSpec,
    log_dir: str | None,
    log_level: str,
    drain_timeout: float,
    ready_timeout: float,
    registry_port: int = 0,
) -> int:
    from tandem.cli.frontend import build_backend, http_server, join_board, listen, uvicorn_config
    from tandem.cli.worker import freeze_startup_heap
    from tandem.control.discovery import MemoryDiscovery
    from tandem.control.registry import RegistryServer
    from tandem.deploy.local import LocalLauncher
    from tandem.router.load_board import LoadBoard

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness poll is not news
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    several = spec.frontends > 1
    try:
        sock = listen(spec.host, spec.port, reuse_port=several)
    except OSError as e:
        print(f"tandem serve: cannot listen on {spec.host}:{spec.port}: {e}", file=sys.stderr)
        return 2
    store = MemoryDiscovery()
    registry = RegistryServer(store, host=spec.host, port=registry_port)
    await registry.start()
    board = LoadBoard.create(spec.frontends) if several else None
    board_task = asyncio.create_task(_assign_columns(store, board), name="load-board") if board else None
    backend = build_backend(spec, store, board)
    launcher = LocalLauncher(
        spec, registry.address, log_dir=log_dir, log_level=log_level, drain_timeout=drain_timeout
    )
    server = http_server(uvicorn_config(backend))
    sockets = [sock]
    if board is not None:  # this process's own listener, for the other frontends' /metrics
        sockets.append(listen("127.0.0.1", 0))
        join_board(server.config.app.state.frontend.metrics, board)
    http_task = asyncio.create_task(server.serve(sockets=sockets), name="http")
    code = 0
    try:
        await launcher.start()
        ready = await _wait_ready(spec, store, launcher, stop, ready_timeout)
        if ready and board is not None:
            ready = await _start_frontends(spec, launcher, registry.address, board, stop, ready_timeout)
        if ready:
            await server.config.app.state.frontend.warm_up()
            server.config.app.state.frontend.watch_loop()
            freeze_startup_heap()
            if board is not None:
                board.mark_ready(sockets[1].getsockname()[1])
            more = f", {spec.frontends} frontend processes" if several else ""
            url = f"http://{spec.host}:{spec.port}/v1"
            print(f"Tandem ready: {url} ({spec.num_workers} workers{more})", flush=True)
            print(
                f"Add workers at run time: tandem worker --model {spec.model} --role prefill|decode|agg "
                f"--registry {registry.address}",
                flush=True,
            )
            await _supervise(launcher, stop, board)
        else:
            code = 0 if stop.is_set() else 1
    finally:
        log.info("shutting down: draining %d child processes", len(launcher.children))
        await launcher.stop()
        server.should_exit = True
        await asyncio.wait_for(http_task, 10.0)
        await backend.close()
        if board_task is not None:
            board_task.cancel()
        await registry.close()
        if board is not None:
            board.close()
        for s in sockets:
            s.close()
    return code


async def _assign_columns(store: MemoryDiscovery, board: LoadBoard) -> None:
    """Keep a load-board column for every registered worker."""
    async for workers in store.watch():
        board.assign(w.worker_id for w in workers)


async def _start_frontends(
    spec: DeploymentSpec,
    launcher: LocalLauncher,
    registry: str,
    board: LoadBoard,
    stop: asyncio.Event,
    timeout: float,
) -> bool:
    """Start frontend processes 1..N-1; True once each is serving. False on stop, exit or timeout."""
    from tandem.cli.frontend import frontend_command

    children = []
    for i in range(1, spec.frontends):
        cmd = frontend_command(spec, registry, board, i, launcher.log_level, launcher.drain_timeout)
        children.append(await launcher.spawn_command(f"{FRONTEND}{i}", cmd))
    deadline = asyncio.get_running_loop().time() + timeout
    while not stop.is_set():
        dead = [c for c in children if c.proc.returncode is not None]
        if dead:
            log.error("%s exited before it served (exit %s)", dead[0].worker_id, dead[0].proc.returncode)
            return False
        if board.ready_rows() >= spec.frontends - 1:
            return True
        if asyncio.get_running_loop().time() > deadline:
            log.error("frontend processes not ready after %.0f s", timeout)
            return False
        await asyncio.sleep(0.05)
    return False


async def _wait_ready(
    spec: DeploymentSpec,
    store: MemoryDiscovery,
    launcher: LocalLauncher,
    stop: asyncio.Event,
    timeout: float,
) -> bool:
    """Wait until every worker is registered and /health is green. False on stop, exit or timeout."""
    import httpx

    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            dead = launcher.exited()
            if dead:
                names = ", ".join(f"{c.worker_id} (exit {c.proc.returncode})" for c in dead)
                log.error("workers exited before the deployment was ready: %s", names)
                return False
            ready = [w for w in store.snapshot() if w.status == "ready"]
            if len(ready) >= spec.num_workers:
                try:
                    r = await http.get(f"http://{spec.host}:{spec.port}/health", timeout=2.0)
                    if r.status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
            if asyncio.get_running_loop().time() > deadline:
                log.error(
                    "not ready after %.0f s (%d/%d workers registered)", timeout, len(ready), spec.num_workers
                )
                return False
            await asyncio.sleep(0.2)
    return False


async def _supervise(launcher: LocalLauncher, stop: asyncio.Event, board: LoadBoard | None) -> None:
    """Serve until told to stop. A worker that dies is reported (the router already skips it). A
    frontend process that dies is reported, its load leaves the board, and it is started again
    (its connections are lost; new ones go to the others until it listens again), unless it died
    `RESTARTS` times within `RESTART_WINDOW` seconds."""
    reported: set[int] = set()
    restarts: dict[str, list[float]] = {}
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        for c in launcher.exited():
            if c.pid in reported:
                continue
            reported.add(c.pid)
            log.error("%s exited with code %s", c.worker_id, c.proc.returncode)
            if board is None or not c.worker_id.startswith(FRONTEND):
                continue
            board.clear_row(int(c.worker_id.removeprefix(FRONTEND)))
            recent = [t for t in restarts.get(c.worker_id, []) if t > loop.time() - RESTART_WINDOW]
            if len(recent) >= RESTARTS:
                log.error(
                    "%s died %d times in %.0f s: not restarted", c.worker_id, len(recent), RESTART_WINDOW
                )
                continue
            restarts[c.worker_id] = [*recent, loop.time()]
            await launcher.spawn_command(c.worker_id, c.command)
            log.warning("%s restarted", c.worker_id)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass

"""`tandem frontend`: one more HTTP frontend process of a `tandem serve` deployment, on its port.

    tandem serve --model DIR --workers 2 --frontends 2     # starts the second one itself

One Python frontend is one event loop on one core: it parses requests, renders chat templates,
tokenizes, routes and writes every token's SSE event. Under a burst of requests the ones behind
wait for the loop (vLLM's `--api-server-count` and Dynamo's frontend threads answer the same
problem). With `--frontends N`, `tandem serve` runs N-1 of these beside its own: every process
listens on the same address with SO_REUSEPORT, so the kernel spreads connections over them; each
watches the embedded registry and routes its own requests, adding the others' load (in-flight
requests; KV blocks and queued prefill tokens for the KV router) from a shared `LoadBoard`, so its
picks stay balanced over the whole deployment.

Also here: the HTTP pieces `tandem serve` and this command share (listener, uvicorn server,
router backend for a deployment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.control.discovery import Discovery
    from tandem.deploy.spec import DeploymentSpec
    from tandem.frontend.metrics import FrontendMetrics
    from tandem.router.backend import RouterBackend
    from tandem.router.load_board import LoadBoard

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "frontend", help="one more frontend process of a deployment (`tandem serve --frontends N` runs it)"
    )
    p.add_argument("--deployment", required=True, help="the deployment as JSON (DeploymentSpec.to_dict)")
    p.add_argument("--registry", required=True, help="the embedded registry's host:port")
    p.add_argument("--load-board", required=True, help="path of the deployment's load board")
    p.add_argument("--load-board-columns", type=int, required=True)
    p.add_argument("--index", type=int, required=True, help="this frontend's row on the board (1..N-1)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish open streams")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from tandem.cli.worker import run_event_loop
    from tandem.deploy.spec import DeploymentSpec

    spec = DeploymentSpec.from_dict(json.loads(args.deployment))
    return run_event_loop(
        serve_frontend(
            spec, args.registry, args.load_board, args.load_board_columns, args.index, args.drain_timeout
        )
    )


async def serve_frontend(
    spec: DeploymentSpec, registry: str, board_path: str, columns: int, index: int, drain_timeout: float
) -> int:
    from tandem.cli.worker import freeze_startup_heap
    from tandem.control.registry import RemoteDiscovery
    from tandem.router.load_board import LoadBoard

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    board = LoadBoard.attach(board_path, spec.frontends, columns, index)
    discovery = RemoteDiscovery(registry)
    backend = build_backend(spec, discovery, board)
    server = http_server(uvicorn_config(backend), drain_timeout)
    try:
        # Serve only once the registry's workers are in view: a request must not be told that no
        # worker is live while `tandem serve` already said the deployment is ready.
        deadline = loop.time() + 30.0
        while len(discovery.snapshot()) < spec.num_workers and loop.time() < deadline:
            await asyncio.sleep(0.05)
        frontend = server.config.app.state.frontend
        await frontend.warm_up()
        sock = listen(spec.host, spec.port, reuse_port=True, first=False)
        own = listen("127.0.0.1", 0)
        join_board(frontend.metrics, board)
        http_task = asyncio.create_task(server.serve(sockets=[sock, own]), name="http")
        while not server.started and not http_task.done():
            await asyncio.sleep(0.01)
        frontend.watch_loop()
        freeze_startup_heap()
        board.mark_ready(own.getsockname()[1])
        log.info("frontend %d ready on %s:%d", index, spec.host, spec.port)
        await asyncio.wait([asyncio.ensure_future(stop.wait()), http_task], return_when="FIRST_COMPLETED")
        # Graceful: stop accepting, let open streams finish (up to the drain timeout), then exit.
        server.should_exit = True
        await http_task
        sock.close()
        own.close()
    finally:
        await backend.close()
        await discovery.close()
        board.close()
    return 0


def join_board(metrics: FrontendMetrics, board: LoadBoard) -> None:
    """Let this process's /metrics gather the other frontend processes' (on their own listeners)."""
    metrics.index = board.row
    url = "http://127.0.0.1:{}/metrics?scope=process"
    metrics.peers = lambda: [(row, url.format(port)) for row, port in board.peers()]


def build_backend(spec: DeploymentSpec, discovery: Discovery, board: LoadBoard | None) -> RouterBackend:
    """The router of a deployment's frontend: its policy, disaggregation rule and wait queue."""
    from tandem.router.admission import AdmissionQueues
    from tandem.router.backend import RouterBackend
    from tandem.router.basic import make_policy
    from tandem.router.disagg import DisaggPolicy

    disagg = DisaggPolicy(spec.disagg_min_prompt_tokens, spec.enforce_disagg)
    queue = AdmissionQueues(spec.queue_size, spec.queue_timeout) if spec.queue_size else None
    policy = make_policy(spec.policy, spec.kv_policy)
    return RouterBackend(discovery, policy, disagg=disagg, admission=queue, board=board)


def uvicorn_config(backend: RouterBackend) -> Any:
    import uvicorn

    from tandem.frontend.app import create_app
    from tandem.router.worker_metrics import WorkerMetrics

    app = create_app(backend)
    metrics = app.state.frontend.metrics
    collector = getattr(backend.policy, "collector", None)
    if collector is not None:  # the KV router's hit rate, decision time, load and decisions
        metrics.registry.register(collector())
    metrics.registry.register(backend.disagg_metrics)  # prefill and hand-off times
    if backend.admission is not None:  # requests waiting for a worker under its busy limit
        metrics.registry.register(backend.admission.collector())
    workers = WorkerMetrics(backend.pool, backend.workers)  # each engine's phases, KV, cache hits
    metrics.registry.register(workers)
    metrics.refreshers.append(workers.refresh)
    return uvicorn.Config(
        app, http="httptools", loop="none", access_log=False, log_level="warning", lifespan="on"
    )


def listen(host: str, port: int, *, reuse_port: bool = False, first: bool = True) -> socket.socket:
    """The HTTP listener. `reuse_port`: other frontend processes of this deployment listen too;
    `first` (the deployment's first frontend): the port must be free, not merely shareable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if reuse_port and first:
        # With SO_REUSEPORT, any process of this user that sets it too may bind the same port, so
        # a second deployment started on a busy port would silently take half its connections.
        # A plain bind fails on a port anyone holds: try one first.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    # We bind the socket ourselves: TCP_NODELAY set on the listener is inherited by every accepted
    # connection, so SSE token events leave without waiting for delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def http_server(config: Any, drain_timeout: float | None = None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn minus its signal handlers: this process decides the shutdown order (workers drain
        first, while their HTTP streams are still being served)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    if drain_timeout is not None:
        config.timeout_graceful_shutdown = drain_timeout
    return Server(config)


def frontend_command(
    spec: DeploymentSpec, registry: str, board: LoadBoard, index: int, log_level: str, drain_timeout: float
) -> list[str]:
    """The command line `tandem serve` starts frontend `index` (1..N-1) with."""
    import json

    cmd = [sys.executable, "-m", "tandem.cli.main", "--log-level", log_level, "frontend"]
    cmd += ["--deployment", json.dumps(spec.to_dict()), "--registry", registry]
    cmd += ["--load-board", board.path, "--load-board-columns", str(board.columns), "--index", str(index)]
    return [*cmd, "--drain-timeout", str(drain_timeout)]

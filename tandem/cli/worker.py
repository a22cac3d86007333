"""`tandem worker`: one engine process serving the request plane, registered with a registry.

Prints one readiness line on stdout ("Tandem worker <id> ready on <host:port>") once it is listening
and registered. SIGTERM or Ctrl-C drains it: it is marked draining (routers stop sending), in-flight
requests finish (up to --drain-timeout), then it deregisters and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from tandem import env
from tandem.deploy.spec import ENGINE_ARGS
from tandem.engine.config import EngineConfig
from tandem.engines.factory import ENGINES

if TYPE_CHECKING:
    from tandem.worker.worker import WorkerConfig

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="run one inference worker (request-plane server)")
    p.add_argument("--model", required=True, help="checkpoint folder (sim engine: config.json is enough)")
    p.add_argument("--served-model-name", default=None, help="default: the folder's name")
    p.add_argument("--engine", choices=ENGINES, default="builtin")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (the registry learns it)")
    p.add_argument("--role", choices=["agg", "prefill", "decode"], default="agg")
    p.add_argument("--registry", default=None, help="host:port of the embedded registry to join")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--speedup", type=float, default=1.0, help="sim engine: run faster than modelled time")
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--scheduler-delay-factor",
        type=float,
        default=0.0,
        help="while decoding, hold new prompts until the oldest waited this many prompt-step times",
    )
    p.add_argument(
        "--regroup-steps",
        type=float,
        default=EngineConfig.regroup_steps,
        help="when idle, hold new prompts until as many arrived as requests just finished, at most "
        "this many decode-step times (0: off)",
    )
    p.add_argument(
        "--regroup-window-steps",
        type=float,
        default=EngineConfig.regroup_window_steps,
        help="requests that finished at most this many decode-step times before a new prompt count "
        "as ones whose replacements may still come (see --regroup-steps)",
    )
    p.add_argument(
        "--regroup-expect-steps",
        type=float,
        default=EngineConfig.regroup_expect_steps,
        help="hold new prompts up to this many decode-step times while prompts a router announced "
        "would complete the turnover (see --regroup-steps; 0: ignore announcements)",
    )
    p.add_argument(
        "--regroup-pace-steps",
        type=float,
        default=EngineConfig.regroup_pace_steps,
        help="let the regroup hold run up to this many decode-step times while the prompts missing "
        "from a turnover are due by then at the pace the others came (see --regroup-steps)",
    )
    p.add_argument("--lease-ttl", type=float, default=3.0, help="seconds without heartbeat before expiry")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument(
        "--kv-hold-timeout",
        type=float,
        default=120.0,
        help="prefill side: free KV blocks no decode worker has read after this many seconds",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem.worker.worker import WorkerConfig

    config = WorkerConfig(
        model_dir=args.model,
        engine=args.engine,
        served_model_name=args.served_model_name,
        worker_id=args.worker_id,
        host=args.host,
        port=args.port,
        role=args.role,
        engine_config=engine_config_from_args(args),
        dtype=args.dtype,
        device=args.device,
        speedup=args.speedup,
        lease_ttl=args.lease_ttl,
        drain_timeout=args.drain_timeout,
        kv_hold_timeout=args.kv_hold_timeout,
    )
    apply_switch_interval()
    return run_event_loop(serve_worker(config, args.registry))


def apply_switch_interval() -> None:
    """This worker process's GIL switch interval (`tandem.env.worker_switch_interval_s`)."""
    interval = env.worker_switch_interval_s()
    if interval is not None:
        sys.setswitchinterval(interval)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The engine flags, one per `ENGINE_ARGS` key (the list `tandem serve` and deployment files
    pass on), as an EngineConfig."""
    return EngineConfig(**{key: getattr(args, key) for key in ENGINE_ARGS})


def freeze_startup_heap() -> None:
    """Put everything allocated so far (imports, tokenizer, model, engine) out of the garbage
    collector's reach, once the process is ready to serve.

    Why: a full collection walks every tracked object. In the frontend that is ~300k objects after
    start-up, ~120 ms a collection on this machine, and it stalls every stream on the event loop
    whenever it comes during serving. What start-up allocated lives as long as the process anyway,
    so collections afterwards only need to look at what serving allocates (vLLM does the same).
    """
    gc.collect()
    gc.freeze()


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine on uvloop when it is installed (the serving loop's hot path is socket I/O)."""
    try:
        import uvloop

        return int(uvloop.run(main))
    except ImportError:
        return int(asyncio.run(main))


async def serve_worker(config: WorkerConfig, registry: str | None) -> int:
    from tandem.control.registry import RemoteDiscovery
    from tandem.worker.worker import Worker

    discovery = RemoteDiscovery(registry) if registry else None
    worker = Worker(config, discovery)
    _tag_logs(worker.worker_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.start()
        freeze_startup_heap()
        print(f"Tandem worker {worker.worker_id} ready on {worker.address}", flush=True)
        await stop.wait()
        await worker.drain()
    finally:
        await worker.stop()
        if discovery is not None:
            await discovery.close()
    return 0


def _tag_logs(worker_id: str) -> None:
    # Every line of this process carries the worker id, so interleaved logs of a deployment grep apart.
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [{worker_id}] %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        _tag_logs(worker_id)

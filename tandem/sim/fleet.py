"""Fleet simulator: N simulated engines (real scheduler + KV manager, timed steps) on one virtual clock.

Discrete-event loop. Each worker is idle or busy until the end of its current step; the loop jumps
to the earliest of (next arrival, earliest step end):

    time ─────────────────────────────────────────────────────────────────────►
    arrivals     a0 a1        a2                   a3
    worker 0     [ step ][ step ][ step ]    (idle)  [ step ]...
    worker 1        [    step     ][ step ][ step ]...

- An arrival is routed at once (the router sees the workers as they are then) and queued on its
  worker; an idle worker starts a step at that time. Arrivals at the same instant are all queued
  before any worker starts, so they batch together.
- A step is one `EngineCore.step()` (schedule -> execute -> update) run when the step starts; its
  duration comes from the timing model, and its tokens become visible when it ends. Requests that
  arrive during a step wait for the next one, as on a real engine.
- When a step ends, its tokens are recorded at that time and the worker starts its next step at
  once if it has work.
- A router may find every worker past its busy limit (it returns None). The request then waits in
  the router's FIFO queue, as in `router/admission.py`: at most `queue_size` wait (0: refused at
  once), each for at most `queue_timeout` seconds; the head is routed again after every step end
  (first tokens and finishes free load). Refused requests never finish: the summary counts them.

Nothing sleeps: an hour of trace replays as fast as the scheduler's Python allows.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tandem.bench.traces import TraceRequest
from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import SamplingParams
from tandem.engines.sim.clock import VirtualClock
from tandem.engines.sim.executor import SimExecutor
from tandem.engines.sim.timing import PolynomialTiming, TimingModel
from tandem.protocol.errors import InvalidRequestError
from tandem.protocol.messages import EngineOutput
from tandem.sim.metrics import RequestRecord, RunMetrics
from tandem.sim.routing import RoundRobinRouter, Router

log = logging.getLogger(__name__)


class _Busy:
    """The router found every worker past its busy limit."""


BUSY = _Busy()


@dataclass(frozen=True)
class FleetConfig:
    """One fleet of identical simulated workers."""

    num_workers: int = 4
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            block_size=512,
            num_blocks=2048,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            cache_blocks_on_schedule=True,
        )
    )
    """Every worker's engine settings (defaults: Dynamo's replay settings for the Mooncake trace)."""
    timing: TimingModel = field(default_factory=PolynomialTiming)
    speedup: float = 1.0
    """Engine speed-up: every step lasts timing / speedup (Dynamo's `--speedup-ratio`)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.engine.num_blocks is None:
            raise ValueError("a simulated fleet needs engine.num_blocks set")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")


class SimWorker:
    """One simulated engine and the fleet's bookkeeping for it. Routers read it, never write it."""

    def __init__(self, index: int, config: FleetConfig) -> None:
        self.index = index
        self.clock = VirtualClock()
        """The executor's own clock; the fleet keeps time itself and only reads step durations."""
        # No regroup hold: it times itself on the engine's clock, which here moves only with steps.
        engine = replace(config.engine, regroup_steps=0.0)
        self.executor = SimExecutor(
            None, engine, timing=config.timing, clock=self.clock, speedup=config.speedup
        )
        self.core = EngineCore(engine, self.executor)
        self.num_active = 0
        """Requests routed here and not finished."""
        self.busy = False
        self.step_end = 0.0
        self.pending: list[EngineOutput] = []
        """Outputs of the running step, delivered when it ends."""


class Fleet:
    """Replays requests through `config.num_workers` workers routed by `router`."""

    def __init__(
        self,
        config: FleetConfig,
        router: Router | None = None,
        *,
        queue_size: int = 0,
        queue_timeout: float = 30.0,
    ) -> None:
        if queue_size < 0 or queue_timeout <= 0:
            raise ValueError("queue_size must be >= 0 and queue_timeout > 0")
        self.config = config
        self.router = router or RoundRobinRouter()
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.workers = [SimWorker(i, config) for i in range(config.num_workers)]
        self.now = 0.0
        # Optional router hooks (the KV router's): see `tandem.sim.routing.FleetObserver`.
        attach = getattr(self.router, "attach", None)
        if attach is not None:
            attach(self.workers)
        self._on_output = getattr(self.router, "on_output", None)

    def run(
        self,
        requests: Sequence[TraceRequest],
        *,
        until: float | None = None,
        concurrency: int | None = None,
        send_at: Callable[[float], float] | None = None,
    ) -> RunMetrics:
        """Replay `requests` to completion, or until simulated time `until`. Returns the records;
        request i has record i, is routed i-th, and is named str(i) in its engine and in the
        router's hooks.

        Open loop (`concurrency` None): requests arrive at their `arrival_s` (sorted here first).
        Closed loop (`concurrency` C): arrival times are ignored; the client sends the first C
        requests at time 0 and each one that finishes sends the next, in the given order (a client
        with C connections, like `aiperf --concurrency` or the referee). A request sent at t
        arrives at t, or at `send_at(t)`: a model of the time a live client and frontend take to
        turn a send into a request at the engine.
        """
        closed = concurrency is not None
        c = concurrency or 0
        if closed and c < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        reqs = list(requests) if closed else sorted(requests, key=lambda r: r.arrival_s)
        n = len(reqs)
        # Closed loop: when the next requests arrive (a heap); they go in request order.
        sends = sorted(send_at(0.0) if send_at else 0.0 for _ in range(min(n, c)))
        issued = len(sends)
        # Closed loop: a record's arrival is set when the request is sent.
        records = [RequestRecord(0.0 if closed else r.arrival_s, r.input_len) for r in reqs]
        metrics = RunMetrics(records=records)
        on_tokens = metrics.on_tokens
        workers = self.workers
        on_output = self._on_output
        heap: list[tuple[float, int]] = []
        held: deque[tuple[float, int]] = deque()
        """Requests waiting for a worker under its busy limit: (deadline, request index)."""
        # Closed loop: workers whose step ended when new requests were sent; they start after those
        # requests are queued, so a request sent at t can join a step that starts at t.
        deferred: list[SimWorker] = []

        def send_next(t: float) -> None:
            """Closed loop: a request ended (finished or refused) at t; its connection sends the next."""
            nonlocal issued
            if closed and issued < n:
                heapq.heappush(sends, send_at(t) if send_at else t)
                issued += 1

        i = 0
        wall0 = time.perf_counter()
        while i < n or heap:
            if closed:
                ta = sends[0] if sends and i < n else math.inf
            else:
                ta = reqs[i].arrival_s if i < n else math.inf
            # Ties: open loop routes arrivals before ending steps at the same instant; closed loop
            # ends every step first, since the requests sent at that instant come from those ends.
            if ta < math.inf and (not heap or ta < heap[0][0] or (not closed and ta == heap[0][0])):
                t = ta
                if until is not None and t > until:
                    break
                self.now = t
                touched: list[SimWorker] = deferred
                deferred = []
                while i < n and (sends and sends[0] <= t if closed else reqs[i].arrival_s <= t):
                    if closed:
                        heapq.heappop(sends)
                        records[i].arrival = t
                    # Strict FIFO: while requests wait for room, a new one queues behind them.
                    w = self._arrive(reqs[i], i, records[i], t) if not held else BUSY
                    if w is BUSY:
                        if len(held) < self.queue_size:
                            held.append((t + self.queue_timeout, i))
                            metrics.router_waited += 1
                        else:
                            metrics.router_shed += 1
                            w = None
                    if w is None:
                        send_next(t)  # rejected: its connection sends the next one
                    elif isinstance(w, SimWorker) and not w.busy:
                        touched.append(w)
                    i += 1
                for w in touched:
                    if not w.busy:
                        self._start(w, t, heap)
                continue
            t, wi = heapq.heappop(heap)
            if until is not None and t > until:
                break
            self.now = t
            w = workers[wi]
            w.busy = False
            for out in w.pending:
                rec = records[int(out.request_id)]
                done = out.finish_reason is not None
                on_tokens(rec, t, len(out.new_token_ids), out.num_cached_tokens, done)
                if on_output is not None:
                    on_output(t, out)
                if done:
                    w.num_active -= 1
                    send_next(t)
            w.pending = []
            if held:
                for _ in range(self._route_held(t, held, reqs, records, metrics, heap, w)):
                    send_next(t)
            if closed and i < n and sends and sends[0] <= t:
                deferred.append(w)
            else:
                self._start(w, t, heap)
        metrics.wall_s = time.perf_counter() - wall0
        metrics.num_steps = sum(w.core.num_steps for w in workers)
        return metrics

    def _route_held(
        self,
        t: float,
        held: deque[tuple[float, int]],
        reqs: Sequence[TraceRequest],
        records: list[RequestRecord],
        metrics: RunMetrics,
        heap: list[tuple[float, int]],
        ended: SimWorker,
    ) -> int:
        """Route waiting requests in order until the router finds every worker busy again; idle
        workers that got one start now (`ended`, whose step just ended, starts after). Returns how
        many were refused (timed out, or rejected by the engine)."""
        refused = 0
        while held:
            deadline, j = held[0]
            if deadline < t:
                held.popleft()
                metrics.router_timeouts += 1
                refused += 1
                continue
            w = self._arrive(reqs[j], j, records[j], t)
            if w is BUSY:
                break
            held.popleft()
            if w is None:
                refused += 1
            elif isinstance(w, SimWorker) and w is not ended and not w.busy:
                self._start(w, t, heap)
        return refused

    def _arrive(self, req: TraceRequest, i: int, rec: RequestRecord, t: float) -> SimWorker | _Busy | None:
        """Queue the request on the worker the router picks: that worker, BUSY (every worker past
        its busy limit: not routed), or None (the engine rejected it)."""
        wi = self.router(req, self.workers, i, t)
        if wi is None:
            return BUSY
        w = self.workers[wi]
        rec.engine = wi
        sampling = SamplingParams(max_tokens=req.output_len, ignore_eos=True)
        try:
            w.core.add_request(req.prompt_token_ids(), sampling, request_id=str(i))
        except InvalidRequestError as e:
            log.warning("request %d rejected by worker %d: %s", i, wi, e)
            return None
        w.num_active += 1
        return w

    def _start(self, w: SimWorker, t: float, heap: list[tuple[float, int]]) -> None:
        if not w.core.has_unfinished():
            return
        w.pending = w.core.step()
        seconds = w.core.last_step_seconds
        if seconds <= 0.0 and not w.pending:
            raise RuntimeError(f"worker {w.index} has unfinished requests but scheduled nothing at t={t}")
        w.busy = True
        w.step_end = t + seconds
        heapq.heappush(heap, (w.step_end, w.index))

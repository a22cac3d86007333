"""Disaggregated fleet simulator: P prefill engines and D decode engines on one virtual clock.

Same discrete-event scheme as `tandem.sim.fleet` (a step runs when it starts, its tokens become
visible when it ends), with a KV hand-off between the pools:

    arrival ──policy──► remote: prefill engine (least queued prompt tokens), max_tokens=1, blocks
       │                        held after the first token
       │                  └─► decode engine (least active KV tokens) admits it: allocates blocks,
       │                      parks it (WAITING_FOR_REMOTE_KV); transfer = latency + KV bytes / link
       │                      └─► transfer done: prefill frees its blocks, the first token is
       │                          delivered, the decode engine continues from it
       └─────────────► local: a decode engine prefills and decodes it (chunked, in its token budget)

`num_prefill=0` is aggregated serving: every engine takes every request locally. The policy is
`tandem.router.disagg.DisaggPolicy`, so a threshold on the prompt length gives conditional
disaggregation. Both engines account the request's KV blocks for their whole stay: the prefill
engine until the transfer ends, the decode engine from admission (before the bytes arrive).

TTFT counts from arrival to the first token's delivery: for a remote request that is when its KV
has landed on the decode engine (the decode stream starts there), so it includes the transfer.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tandem.bench.traces import TraceRequest
from tandem.engine.config import EngineConfig
from tandem.engine.connector import ExternalMatch, FinishedTransfers, KVConnectorScheduler, KVConnectorWorker
from tandem.engine.core import EngineCore
from tandem.engine.request import Request, SamplingParams
from tandem.engines.sim.clock import VirtualClock
from tandem.engines.sim.executor import SimExecutor
from tandem.engines.sim.timing import TimingModel
from tandem.protocol.errors import InvalidRequestError
from tandem.protocol.messages import EngineOutput
from tandem.router.disagg import DisaggPolicy
from tandem.sim.metrics import RequestRecord, RunMetrics

log = logging.getLogger(__name__)

_STEP_END, _TRANSFER_DONE = 0, 1


@dataclass(frozen=True)
class PDFleetConfig:
    """A fleet of `num_prefill` prefill and `num_decode` decode (or aggregated) simulated GPUs."""

    num_prefill: int
    num_decode: int
    """Engines that decode; with `num_prefill=0` they are aggregated engines."""
    prefill_engine: EngineConfig
    decode_engine: EngineConfig
    timing: TimingModel
    kv_bytes_per_token: float
    """Bytes a prompt token's KV takes on the link (all layers, K and V)."""
    link_bytes_per_s: float = 50e9
    """Prefill -> decode bandwidth per transfer (NVLink-class 50 GB/s; InfiniBand NDR 12.5 GB/s)."""
    transfer_latency_s: float = 0.001
    """Fixed cost per transfer: the decode engine's read request and the completion notice."""
    policy: DisaggPolicy = field(default_factory=lambda: DisaggPolicy(min_remote_prompt_tokens=0))
    """Remote or local prefill per request; threshold 0 disaggregates every request."""

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("need num_prefill >= 0 and num_decode >= 1")
        if self.prefill_engine.num_blocks is None or self.decode_engine.num_blocks is None:
            raise ValueError("simulated engines need num_blocks set")
        if self.link_bytes_per_s <= 0 or self.transfer_latency_s < 0:
            raise ValueError("need link_bytes_per_s > 0 and transfer_latency_s >= 0")


class SimKVLink(KVConnectorScheduler, KVConnectorWorker):
    """Both connector sides of one simulated engine. It moves no bytes; the fleet keeps the time.

    Prefill side: a request with ``kv_transfer_params={"hold": True}`` keeps its blocks after it
    finishes, until the fleet calls `release`. Decode side: a request with ``{"remote_tokens": n}``
    loads its first n tokens asynchronously: the scheduler allocates its blocks and parks it, the
    fleet reads the admitted loads from `take_started` and calls `complete` when the bytes are in.
    """

    def __init__(self) -> None:
        self._started: list[tuple[str, int]] = []
        self._sending: set[str] = set()
        self._receiving: set[str] = set()

    def get_num_new_matched_tokens(self, request: Request, num_local_tokens: int) -> ExternalMatch:
        params = request.kv_transfer_params
        remote = int(params.get("remote_tokens", 0)) if params else 0
        if remote <= num_local_tokens:
            return ExternalMatch()
        return ExternalMatch(remote - num_local_tokens, load_async=True)

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        self._started.append((request.request_id, num_external_tokens))
        # A load is offered once: the prefill engine frees its copy when this one lands, so a
        # request preempted here later recomputes its prompt locally.
        request.kv_transfer_params = None

    def build_meta(self) -> None:
        return None

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        return bool(params and params.get("hold")), None

    def start_load_kv(self, meta: Any) -> None:
        pass

    def save_kv(self, meta: Any) -> None:
        pass

    def get_finished(self) -> FinishedTransfers:
        done = FinishedTransfers(self._sending, self._receiving)
        self._sending, self._receiving = set(), set()
        return done

    def take_started(self) -> list[tuple[str, int]]:
        """(request id, tokens to load) for loads admitted since the last call."""
        started, self._started = self._started, []
        return started

    def release(self, request_id: str) -> None:
        self._sending.add(request_id)

    def complete(self, request_id: str) -> None:
        self._receiving.add(request_id)


class PDWorker:
    """One simulated GPU and the fleet's load bookkeeping for it."""

    def __init__(self, index: int, prefill: bool, engine: EngineConfig, timing: TimingModel) -> None:
        self.index = index
        self.prefill = prefill
        self.link = SimKVLink()
        # The executor's own clock: the fleet keeps time and only reads step durations. No regroup
        # hold: it times itself on that clock, which moves only with steps.
        engine = replace(engine, regroup_steps=0.0)
        self.executor = SimExecutor(None, engine, timing=timing, clock=VirtualClock())
        self.core = EngineCore(engine, self.executor, connector=(self.link, self.link))
        self.busy = False
        self.pending: list[EngineOutput] = []
        self.prefill_tokens = 0
        """Prompt tokens routed here whose first token is not out yet (routing load)."""
        self.kv_tokens = 0
        """Context tokens of requests decoding here, routed and not finished (routing load)."""

    def poll_transfers(self) -> None:
        done = self.link.get_finished()
        if done.sending or done.receiving:
            self.core.scheduler.process_finished_transfers(done.sending, done.receiving)


@dataclass
class PDStats:
    num_remote: int = 0
    num_local: int = 0
    num_rejected: int = 0
    transfer_s: list[float] = field(default_factory=list)
    """Per remote request: seconds from the end of its prefill to its first token's delivery
    (waiting for decode blocks + the transfer)."""


class PDFleet:
    """Runs requests through a P/D (or aggregated) fleet; `run` returns per-request records."""

    def __init__(self, config: PDFleetConfig) -> None:
        self.config = config
        c = config
        self.prefill = [PDWorker(i, True, c.prefill_engine, c.timing) for i in range(c.num_prefill)]
        self.decode = [
            PDWorker(c.num_prefill + i, False, c.decode_engine, c.timing) for i in range(c.num_decode)
        ]
        self.workers = self.prefill + self.decode
        self.stats = PDStats()
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._rr = 0

    def run(self, requests: Sequence[TraceRequest]) -> RunMetrics:
        """Run `requests` (sorted by arrival here) to completion; record i is the i-th arrival."""
        reqs = sorted(requests, key=lambda r: r.arrival_s)
        self._reqs = reqs
        self._metrics = metrics = RunMetrics(records=[RequestRecord(r.arrival_s, r.input_len) for r in reqs])
        self._prefill_of: dict[int, PDWorker] = {}
        self._decode_of: dict[int, PDWorker] = {}
        self._handoff: dict[int, tuple[float, int, int]] = {}
        heap = self._heap
        n, i = len(reqs), 0
        wall0 = time.perf_counter()
        while i < n or heap:
            if i < n and (not heap or reqs[i].arrival_s <= heap[0][0]):
                t = self.now = reqs[i].arrival_s
                touched: dict[int, PDWorker] = {}
                while i < n and reqs[i].arrival_s <= t:
                    w = self._arrive(i)
                    if w is not None:
                        touched[w.index] = w
                    i += 1
                for w in touched.values():  # same-instant arrivals batch into one step
                    self._kick(w, t)
                continue
            t, _, kind, a = heapq.heappop(heap)
            self.now = t
            if kind == _STEP_END:
                self._step_end(self.workers[a], t)
            else:
                self._transfer_done(a, t)
        metrics.wall_s = time.perf_counter() - wall0
        metrics.num_steps = sum(w.core.num_steps for w in self.workers)
        return metrics

    def _push(self, t: float, kind: int, a: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a))

    def _pick(self, pool: list[PDWorker], load: Any) -> PDWorker:
        """Least `load(worker)`; ties rotate so an idle pool spreads work."""
        n = len(pool)
        best = min(range(n), key=lambda k: (load(pool[(self._rr + k) % n]), k))
        self._rr += 1
        return pool[(self._rr - 1 + best) % n]

    def _arrive(self, i: int) -> PDWorker | None:
        r = self._reqs[i]
        mode = self.config.policy.mode(r.input_len, r.output_len, bool(self.prefill), True)
        if mode == "refuse":
            self.stats.num_rejected += 1
            return None
        # A one-token request is done when its prefill is: nothing to hand off.
        remote = mode == "remote" and r.output_len > 1
        if remote:
            w = self._pick(self.prefill, lambda w: w.prefill_tokens)
            sampling = SamplingParams(max_tokens=1, ignore_eos=True)
            params: dict[str, Any] | None = {"hold": True}
        else:
            w = self._pick(self.decode, lambda w: w.prefill_tokens + w.kv_tokens)
            sampling = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            params = None
        try:
            w.core.add_request(r.prompt_token_ids(), sampling, request_id=str(i), kv_transfer_params=params)
        except InvalidRequestError as e:
            log.warning("request %d rejected: %s", i, e)
            self.stats.num_rejected += 1
            return None
        self._metrics.records[i].engine = w.index
        w.prefill_tokens += r.input_len
        if remote:
            self.stats.num_remote += 1
            self._prefill_of[i] = w
        else:
            self.stats.num_local += 1
            w.kv_tokens += r.input_len
            self._decode_of[i] = w
        return w

    def _kick(self, w: PDWorker, t: float) -> None:
        """Start `w`'s next step at `t` if it is idle and has work; time any loads it admitted."""
        if w.busy:
            return
        w.poll_transfers()
        if not w.core.has_runnable():
            return
        w.pending = w.core.step()
        for rid, tokens in w.link.take_started():
            delay = self.config.transfer_latency_s + tokens * self.config.kv_bytes_per_token / (
                self.config.link_bytes_per_s
            )
            self._push(t + delay, _TRANSFER_DONE, int(rid))
        seconds = w.core.last_step_seconds
        if seconds <= 0.0 and not w.pending:
            return  # only parked loads, or no blocks: a transfer or a finish wakes it
        w.busy = True
        self._push(t + seconds, _STEP_END, w.index)

    def _step_end(self, w: PDWorker, t: float) -> None:
        w.busy = False
        records, reqs = self._metrics.records, self._reqs
        for out in w.pending:
            i = int(out.request_id)
            r, rec = reqs[i], records[i]
            if w.prefill:
                w.prefill_tokens -= r.input_len
                self._hand_off(i, out, t)
                continue
            if rec.num_tokens == 0:
                w.prefill_tokens -= r.input_len
            n = len(out.new_token_ids)
            done = out.finish_reason is not None
            self._metrics.on_tokens(rec, t, n, out.num_cached_tokens, done)
            w.kv_tokens += n
            if done:
                w.kv_tokens -= r.input_len + rec.num_tokens
        w.pending = []
        self._kick(w, t)

    def _hand_off(self, i: int, out: EngineOutput, t: float) -> None:
        """The prefill of request i produced its first token: queue it on a decode engine."""
        r = self._reqs[i]
        d = self._pick(self.decode, lambda w: w.kv_tokens)
        d.core.add_request(
            r.prompt_token_ids(),
            SamplingParams(max_tokens=r.output_len, ignore_eos=True),
            request_id=str(i),
            kv_transfer_params={"remote_tokens": r.input_len},
            output_token_ids=list(out.new_token_ids),
        )
        d.kv_tokens += r.input_len + 1
        self._decode_of[i] = d
        self._handoff[i] = (t, out.num_cached_tokens, len(out.new_token_ids))
        self._kick(d, t)

    def _transfer_done(self, i: int, t: float) -> None:
        rid = str(i)
        p, d = self._prefill_of[i], self._decode_of[i]
        p.link.release(rid)
        d.link.complete(rid)
        t_prefill, cached, n = self._handoff.pop(i)
        self.stats.transfer_s.append(t - t_prefill)
        self._metrics.on_tokens(self._metrics.records[i], t, n, cached, False)
        self._kick(d, t)
        self._kick(p, t)

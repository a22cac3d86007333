"""EngineCore: one engine's loop body. A step is three calls: schedule, execute, update.

The core knows nothing of tokenization, HTTP or sockets: token ids in, `EngineOutput` deltas out.
It is single-threaded; a worker process that serves it from asyncio feeds it from one thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.connector import KVConnectorScheduler, KVConnectorWorker
from tandem.engine.executor import Executor, ExecutorOutput
from tandem.engine.request import Request, SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.kvcache.manager import KVCacheManager
from tandem.protocol.errors import InvalidRequestError
from tandem.protocol.kv_events import KvCacheDump, KvEventSink
from tandem.protocol.messages import EngineOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    kv_usage: float
    num_preemptions: int
    prompt_tokens_total: int
    cached_tokens_total: int
    num_steps: int
    busy_seconds_total: float = 0.0
    """Sum of the executor's step times (forward pass and sampling; nothing while idle)."""
    prefill_steps: int = 0
    """Steps that computed prompt tokens (whole prompts or chunks of them)."""
    prefill_requests_total: int = 0
    """Prompt pieces computed, summed over steps: / prefill_steps = the mean prefill batch."""
    queue_seconds_total: float = 0.0
    """Requests' time from reaching the engine to their first step, summed (`RequestPhases`)."""
    queued_requests_total: int = 0
    prefill_seconds_total: float = 0.0
    """From a request's first step to its first token here, summed over `first_tokens_total`."""
    first_tokens_total: int = 0
    decode_seconds_total: float = 0.0
    """Gaps between a request's later tokens, summed over `decode_tokens_total` (engine-side ITL)."""
    decode_tokens_total: int = 0
    queue_buckets: tuple[int, ...] = ()
    """Histograms of the same three phases: counts per bucket (`tandem.engine.phases`)."""
    prefill_buckets: tuple[int, ...] = ()
    decode_buckets: tuple[int, ...] = ()


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        *,
        connector: tuple[KVConnectorScheduler, KVConnectorWorker] | None = None,
        event_sink: KvEventSink | None = None,
    ) -> None:
        self.config = config
        self.executor = executor
        self.max_model_len = min(config.max_model_len or executor.max_model_len, executor.max_model_len)
        self.kv = KVCacheManager(executor.num_blocks, config.block_size, config.enable_prefix_caching)
        self.clock = _clock_of(executor)
        """The engine's time (the simulator's may be virtual); request times are on it."""
        self.connector_worker = connector[1] if connector else None
        self.scheduler = Scheduler(
            config,
            self.kv,
            self.max_model_len,
            executor.eos_token_ids,
            connector[0] if connector else None,
            clock=self.clock,
        )
        self.event_sink = event_sink
        self.num_steps = 0
        self.last_step_seconds = 0.0
        self.busy_seconds_total = 0.0
        self.last_step_idle = False
        """The last step scheduled nothing (e.g. every waiting request needs blocks that peers hold)."""
        self._ids = itertools.count()

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: str | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
        output_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Queue a request. Raises InvalidRequestError if it can never run here.

        `output_token_ids` are tokens already generated elsewhere (a prefill worker's first token,
        or a migrated request's tokens so far): the engine continues after them and does not emit
        them again; they count towards `max_tokens`. `arrival_time`: when it reached this engine on
        `clock` (default: now), for the queue time in `EngineStats`.
        """
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: at least one token is needed")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but the context length is "
                f"{self.max_model_len}: at most {self.max_model_len - 1} prompt tokens fit"
            )
        needed = self.kv.blocks_needed(len(prompt_token_ids) + 1)
        if needed > self.kv.num_blocks:
            raise InvalidRequestError(
                f"the prompt needs {needed} KV blocks but this engine has {self.kv.num_blocks}"
            )
        vocab = getattr(self.executor, "vocab_size", None)
        if vocab is not None and (min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(
            request_id=rid,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            block_size=self.config.block_size,
            kv_transfer_params=kv_transfer_params,
            arrival_time=self.clock() if arrival_time is None else arrival_time,
        )
        for token in output_token_ids or ():
            req.append_output(token, None)
        if output_token_ids and req.num_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt and {len(output_token_ids)} generated tokens fill "
                f"the context ({self.max_model_len} tokens)"
            )
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        """Work remains: requests to run, outputs to report, or KV transfers in flight."""
        return self.has_runnable() or self.has_pending_transfers()

    def has_runnable(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.running or s._aborted_outputs)

    def has_pending_transfers(self) -> bool:
        """KV being loaded from a peer, or held for a peer: `step()` must be polled to finish them."""
        s = self.scheduler
        return bool(s.waiting_for_kv or s.held or s.loads_to_drop)

    def seconds_held(self) -> float | None:
        """How long the scheduler holds waiting prompts still (`regroup_steps`): None if it does not."""
        until = self.scheduler.held_until
        return None if until is None else max(0.0, until - self.clock())

    def step(self) -> list[EngineOutput]:
        sched = self.scheduler.schedule()
        if self.connector_worker is not None:
            self.connector_worker.start_load_kv(sched.connector_meta)
        result = self.executor.execute(sched) if not sched.empty else ExecutorOutput()
        if self.connector_worker is not None:
            self.connector_worker.save_kv(sched.connector_meta)
        outputs = self.scheduler.update(sched, result)
        if self.connector_worker is not None:
            done = self.connector_worker.get_finished()
            self.scheduler.process_finished_transfers(done.sending, done.receiving, done.failed)
        events = self.kv.take_events()
        if events and self.event_sink is not None:
            self.event_sink(events)
        self.num_steps += 1
        self.last_step_idle = sched.empty and not outputs
        self.last_step_seconds = result.step_seconds
        self.busy_seconds_total += result.step_seconds
        return outputs

    def kv_dump(self) -> KvCacheDump:
        return self.kv.dump()

    def running_set_changed(self, stats: EngineStats) -> bool:
        """Requests started, ended or queued since `stats` was taken (two length checks)."""
        s = self.scheduler
        waiting = len(s.waiting) + len(s.waiting_for_kv)
        return len(s.running) != stats.num_running or waiting != stats.num_waiting

    def stats(self) -> EngineStats:
        s = self.scheduler
        p = s.phases
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(s.waiting_for_kv),
            num_blocks=self.kv.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            num_used_blocks=self.kv.num_used_blocks,
            kv_usage=self.kv.usage(),
            num_preemptions=s.num_preemptions,
            prompt_tokens_total=s.prompt_tokens_total,
            cached_tokens_total=s.cached_tokens_total,
            num_steps=self.num_steps,
            busy_seconds_total=self.busy_seconds_total,
            prefill_steps=s.prefill_steps,
            prefill_requests_total=s.prefill_requests_total,
            queue_seconds_total=p.queue.sum,
            queued_requests_total=p.queue.count,
            prefill_seconds_total=p.prefill.sum,
            first_tokens_total=p.prefill.count,
            decode_seconds_total=p.decode.sum,
            decode_tokens_total=p.decode.count,
            queue_buckets=tuple(p.queue.counts),
            prefill_buckets=tuple(p.prefill.counts),
            decode_buckets=tuple(p.decode.counts),
        )


def _clock_of(executor: Executor) -> Callable[[], float]:
    """The executor's clock if it keeps one (the simulator's may be virtual), else the monotonic one."""
    clock = getattr(executor, "clock", None)
    now = getattr(clock, "now", None)
    return now if callable(now) else time.monotonic

"""Simulated executor: the real scheduler and KV manager, with a timing model instead of tensors.

Each step lasts `timing.step_ms(shape) / speedup` (see `timing.py` for how prefill and decode parts
combine, matching Dynamo's mocker) on the given clock: a real clock sleeps (serving tests, overhead
benchmarks), a virtual clock jumps (trace replay at data-centre scale). Sampled tokens are
deterministic pseudo-random ids that never hit an end-of-sequence id, so lengths follow `max_tokens`
as in a benchmark with `ignore_eos`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tandem.engine.config import EngineConfig
from tandem.engine.executor import ExecutorOutput, ScheduledRequest, SchedulerOutput
from tandem.engines.sim.clock import Clock, RealClock
from tandem.engines.sim.timing import PolynomialTiming, StepShape, TimingModel

DEFAULT_NUM_BLOCKS = 16384
DEFAULT_VOCAB = 32000


class SimExecutor:
    def __init__(
        self,
        model_dir: str | Path | None,
        config: EngineConfig,
        *,
        timing: TimingModel | None = None,
        clock: Clock | None = None,
        speedup: float = 1.0,
    ) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        model_cfg: dict = {}
        if model_dir is not None:
            cfg_path = Path(model_dir) / "config.json"
            if cfg_path.is_file():
                model_cfg = json.loads(cfg_path.read_text())
        self.num_blocks = config.num_blocks or DEFAULT_NUM_BLOCKS
        self.kv_capacity_tokens = self.num_blocks * config.block_size
        self.max_model_len = config.max_model_len or int(model_cfg.get("max_position_embeddings", 1 << 20))
        eos = model_cfg.get("eos_token_id", ())
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else (eos,) if eos else ()
        self._eos = frozenset(self.eos_token_ids)
        self.vocab_size = int(model_cfg.get("vocab_size", DEFAULT_VOCAB))
        self.timing = timing or PolynomialTiming()
        self.clock = clock or RealClock()
        self._real_clock = isinstance(self.clock, RealClock)
        self._device_end: float | None = None
        self._last_seconds = 0.0
        self._last_scheduled: list[ScheduledRequest] = []
        """The previous step's batch (real clock): does this step carry it on?"""
        self.speedup = speedup

    def execute(self, out: SchedulerOutput) -> ExecutorOutput:
        # Real clock: the clock's own time (time.monotonic), the time base of requests' arrival_time.
        started = self.clock.now() if self._real_clock else 0.0
        sampled: dict[str, tuple[int, float | None]] = {}
        # One pass over the batch for both the timing shape and the sampled tokens: in fleet replays
        # this loop runs once per request per step, millions of times.
        prefill_tokens = prefills = prefill_start = decodes = decode_ctx = attn_pairs = 0
        for item in out.scheduled:
            req = item.request
            n, start = item.num_new_tokens, item.start
            # A decode is one token after a fully computed sequence (its context: start + 1 tokens);
            # anything else is prefill (prompt chunks, recomputes after preemption).
            if n == 1 and start >= len(req.prompt_token_ids):
                decodes += 1
                decode_ctx += start + 1
            else:
                prefill_tokens += n
                prefills += 1
                prefill_start += start
                attn_pairs += n * start + n * (n + 1) // 2
            num_tokens = len(req.all_token_ids)
            if start + n == num_tokens:  # `item.samples`
                sampled[req.request_id] = (self._token(num_tokens, req.prompt_token_ids[0]), None)
        shape = StepShape(
            prefill_tokens,
            decodes,
            out.kv_usage,
            decode_ctx,
            self.kv_capacity_tokens,
            prefills,
            prefill_start,
            attn_pairs,
        )
        seconds = self.timing.step_ms(shape) / 1000.0 / self.speedup
        if self._real_clock:
            # The simulated device runs a step while the host prepares the next (async scheduling,
            # as in vLLM v1 and SGLang's overlap scheduler): the host keeps one step queued, so
            # host work between steps (update, delivery, scheduling) hides under device time.
            # - A step launched within one step's time of the previous one's end starts at that end.
            # - A later one that carries on the previous step's batch (the host stalled: a late
            #   wake-up, a paused process) had been queued before the stall: the device ran it
            #   while the host was away, so the host loses its stall less one step, not all of it
            #   (Dynamo's mocker recovers one step after a host stall too; docs/benchmarks.md,
            #   session 26).
            # - After an idle gap a step starts now. No step starts before its newest request
            #   arrived: a request that came in after the device went idle (or while the host
            #   prepared this step) had no step ready for it.
            begin = started
            device_end, last = self._device_end, self._last_seconds
            if device_end is not None and (started - device_end < last or self._carries_on(out.scheduled)):
                newest = max((item.request.arrival_time for item in out.scheduled), default=started)
                begin = min(started, max(device_end, started - last, newest))
            end = begin + seconds
            self.clock.wait(end - self.clock.now())
            self._device_end, self._last_seconds = end, seconds
            self._last_scheduled = out.scheduled
        else:
            self.clock.wait(seconds)
        return ExecutorOutput(sampled=sampled, step_seconds=seconds)

    def _carries_on(self, scheduled: list[ScheduledRequest]) -> bool:
        """Whether a request of the previous step is in this one (only asked after a host stall)."""
        previous = {item.request.request_id for item in self._last_scheduled}
        return any(item.request.request_id in previous for item in scheduled)

    def _token(self, position: int, salt: int) -> int:
        # A cheap deterministic mix; skip EOS ids so only max_tokens ends a simulated request.
        t = (position * 2654435761 + salt * 40503) % self.vocab_size
        while t in self._eos:
            t = (t + 1) % self.vocab_size
        return t

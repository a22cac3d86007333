"""Scheduler: which requests run in the next step and how many tokens of each.

Algorithm (by token counts, no phases): every request has `num_tokens` known tokens of which
`num_computed_tokens` have KV. Each step, under a token budget, first the running requests then the
waiting ones (FCFS) get `min(num_tokens - num_computed_tokens, budget left)` new tokens. A long
prompt is thus chunked over steps, a decode is a 1-token step, and a prefix hit or KV loaded from a
peer simply starts a request further along. When blocks run out, the most recently admitted running
request is preempted: its blocks are freed (their hashes stay cached, so the recompute is often a
prefix hit) and it goes back to the front of the queue with its tokens so far. Nothing is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from tandem.engine.config import EngineConfig
from tandem.engine.connector import ExternalMatch, KVConnectorScheduler
from tandem.engine.executor import ExecutorOutput, ScheduledRequest, SchedulerOutput
from tandem.engine.phases import RequestPhases
from tandem.engine.regroup import RegroupHold
from tandem.engine.request import Request, RequestStatus
from tandem.kvcache.manager import NO_HIT, KVCacheManager
from tandem.protocol.messages import EngineOutput

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        connector: KVConnectorScheduler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` times `scheduler_delay_factor` (the simulator passes its virtual clock)."""
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.connector = connector
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}
        self.loads_to_drop: dict[str, Request] = {}
        """Aborted while their KV was loading: freed when the load ends."""
        """Finished requests whose blocks a peer still reads."""
        self._finished_ids: set[str] = set()
        self._aborted_outputs: list[EngineOutput] = []
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.prefill_steps = 0
        """Steps that computed prompt tokens (whole prompts or chunks of them)."""
        self.prefill_requests_total = 0
        """Prompt pieces scheduled, summed over steps (/ prefill_steps: the mean prefill batch)."""
        self.phases = RequestPhases()
        self._clock = clock
        self._arrivals: dict[str, float] = {}
        """When each waiting request reached this scheduler (for the delay factor)."""
        self._last_step_time: float | None = None
        self._last_step_admitted = False
        self._last_prompt_seconds = 0.0
        self.regroup = RegroupHold(
            config.regroup_steps,
            config.regroup_window_steps,
            config.regroup_expect_steps,
            config.regroup_pace_steps,
        )
        self._step_prefills = False
        self.held_until: float | None = None
        """Set when the last `schedule` held prompts back to regroup them: when it lets them start."""

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.waiting_for_kv)

    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.regroup.arrived(request.request_id, request.arrival_time)
        if self.config.scheduler_delay_factor:
            self._arrivals[request.request_id] = self._clock()

    def expect(self, request_id: str, at: float | None = None) -> None:
        """A router has sent this request here; it will arrive soon (`RegroupHold.expect`). `at`:
        when the announcement came (the engine's clock; default now)."""
        self.regroup.expect(request_id, self._clock() if at is None else at)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return False
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            # A transfer may still be writing into its blocks: free them once it has stopped.
            del self.waiting_for_kv[request_id]
            req.status = RequestStatus.FINISHED_ABORTED
            self.loads_to_drop[request_id] = req
            self._finished_ids.add(request_id)
            self._aborted_outputs.append(self._output(req, []))
            return True
        else:
            self.waiting.remove(req)
            self._arrivals.pop(request_id, None)
        req.status = RequestStatus.FINISHED_ABORTED
        self._finish(req)
        self._aborted_outputs.append(self._output(req, []))
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self.held_until = None
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens
        preempted: set[str] = set()
        prefills = 0  # items that compute prompt tokens (for `prefill_steps`)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv.allocate(req, n) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            else:
                if req.num_computed_tokens < len(req.prompt_token_ids):  # a chunked prompt goes on
                    prefills += 1
                out.scheduled.append(
                    ScheduledRequest(req, n, req.num_computed_tokens, self.kv.block_ids(req.request_id))
                )
                if self.config.cache_blocks_on_schedule:
                    self.kv.cache_computed_blocks(req, req.num_computed_tokens + n)
                budget -= n
                i += 1

        if not preempted and self._prompts_may_start():
            admitted_from = len(out.scheduled)
            left = self._admit_waiting(out, budget)
            self._last_step_admitted = left < budget
            budget = left
            prefills += sum(
                1 for s in out.scheduled[admitted_from:] if s.start < len(s.request.prompt_token_ids)
            )
        if prefills:
            self.prefill_steps += 1
            self.prefill_requests_total += prefills
        self._step_prefills = bool(prefills)

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        out.preempted_request_ids = preempted
        out.kv_usage = self.kv.usage()
        if self.connector is not None:
            out.connector_meta = self.connector.build_meta()
        return out

    def _prompts_may_start(self) -> bool:
        """The delay factor's gate while requests decode, the regroup hold while none do."""
        if not self._delay_gate_open():
            return False
        return bool(self.running) or self._regroup_open()

    def _regroup_open(self) -> bool:
        """Nothing decodes: the regroup hold's call (`RegroupHold`; see EngineConfig.regroup_steps)."""
        self.held_until = self.regroup.until([r.arrival_time for r in self.waiting], self._clock())
        return self.held_until is None

    def _delay_gate_open(self) -> bool:
        """The delay factor's gate (always open when it is 0 or nothing is decoding)."""
        factor = self.config.scheduler_delay_factor
        if not factor:
            return True
        now = self._clock()
        if self._last_step_admitted and self._last_step_time is not None:
            self._last_prompt_seconds = now - self._last_step_time
        self._last_step_time, self._last_step_admitted = now, False
        if not self.running or not self.waiting:
            return True
        oldest = self._arrivals.get(self.waiting[0].request_id)
        # A preempted request, or one whose KV a peer loaded, resumes at once.
        return oldest is None or now - oldest >= factor * self._last_prompt_seconds

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.find_prefix(req) if req.num_computed_tokens == 0 else NO_HIT
            local = req.num_computed_tokens + hit.num_tokens
            ext = ExternalMatch()
            if self.connector is not None and req.num_computed_tokens == 0:
                ext = self.connector.get_num_new_matched_tokens(req, local)
                assert local + ext.num_tokens < req.num_tokens, "the connector must leave a token to compute"
            remaining = req.num_tokens - local - ext.num_tokens
            if ext.load_async:
                n = 0
            else:
                n = self._chunk(remaining, budget)
                if n < remaining and not self.config.enable_chunked_prefill:
                    break
            new_blocks = self.kv.allocate(req, ext.num_tokens + n, hit)
            if new_blocks is None:
                break
            self.waiting.popleft()
            self._arrivals.pop(req.request_id, None)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = self._clock()
                self.phases.queued(req.first_scheduled_time - req.arrival_time)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens + ext.num_tokens
                self.prompt_tokens_total += req.num_prompt_tokens
                self.cached_tokens_total += req.num_cached_tokens
            if self.connector is not None and ext.num_tokens:
                self.connector.update_state_after_alloc(
                    req, self.kv.block_ids(req.request_id), ext.num_tokens
                )
            req.num_computed_tokens = local + ext.num_tokens
            if ext.load_async:
                req.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self.waiting_for_kv[req.request_id] = req
                continue
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(
                ScheduledRequest(req, n, req.num_computed_tokens, self.kv.block_ids(req.request_id))
            )
            if self.config.cache_blocks_on_schedule:
                self.kv.cache_computed_blocks(req, req.num_computed_tokens + n)
            budget -= n
        return budget

    def _chunk(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        if self.config.long_prefill_token_threshold:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        log.debug("preempted %s (%d tokens so far)", req.request_id, req.num_tokens)

    def update(self, sched: SchedulerOutput, result: ExecutorOutput) -> list[EngineOutput]:
        """Apply a step's results: advance counts, append sampled tokens, stop and free requests.

        The outputs that end a prompt (its first token) come before the step's other outputs: the
        frontend streams them in this order, so a first token does not wait behind a whole batch's
        decode tokens (the first token is the user's wait, a decode token only one of many)."""
        outputs, self._aborted_outputs = self._aborted_outputs, []
        firsts: list[EngineOutput] = []
        now = self._clock() if sched.scheduled else 0.0
        regroup = self.regroup.enabled
        if regroup and sched.scheduled and not self._step_prefills:
            self.regroup.decode_step(result.step_seconds)
        for item in sched.scheduled:
            req = item.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += item.num_new_tokens
            if not self.config.cache_blocks_on_schedule:  # else `schedule` already cached them
                self.kv.cache_computed_blocks(req)
            sampled = result.sampled.get(req.request_id)
            if sampled is None:
                continue
            token, logprob = sampled
            req.append_output(token, logprob)
            self.phases.emitted(req, now)
            stopped = self._check_stop(req, token)
            out = self._output(req, [token], logprob)
            if stopped:
                self.running.remove(req)
                out.kv_transfer_params = self._finish(req)
                if regroup and out.kv_transfer_params is None:  # not a prefill handed to a peer
                    self.regroup.finished(now)
            if item.start < len(req.prompt_token_ids):
                out.engine_ttft_s = now - req.arrival_time
                firsts.append(out)
            else:
                outputs.append(out)
        if regroup:
            self.regroup.forget_before(now)
        return firsts + outputs if firsts else outputs

    def process_finished_transfers(
        self, sending: set[str], receiving: set[str], failed: set[str] | None = None
    ) -> None:
        """Free blocks peers have read; schedule requests whose KV arrived; and for loads that
        failed, fall back to computing the prompt here (the request loses nothing but time)."""
        for rid in sending:
            req = self.held.pop(rid, None)
            if req is not None:
                self.kv.free(req)
                self.requests.pop(rid, None)
        for rid in receiving | (failed or set()):
            dropped = self.loads_to_drop.pop(rid, None)
            if dropped is not None:
                self.kv.free(dropped)
                self.requests.pop(rid, None)
        for rid in receiving:
            req = self.waiting_for_kv.pop(rid, None)
            if req is not None:
                # Loaded once; a later preemption recomputes locally instead of asking the peer again.
                req.kv_transfer_params = None
                req.status = RequestStatus.WAITING
                self.waiting.appendleft(req)
        for rid in failed or ():
            req = self.waiting_for_kv.pop(rid, None)
            if req is not None:
                log.warning("KV load for %s failed; computing its prompt locally", rid)
                self.kv.free(req)
                self.prompt_tokens_total -= req.num_prompt_tokens
                self.cached_tokens_total -= req.num_cached_tokens
                req.num_cached_tokens = -1
                req.num_computed_tokens = 0
                req.kv_transfer_params = None
                req.status = RequestStatus.WAITING
                self.waiting.appendleft(req)

    def _check_stop(self, req: Request, token: int) -> bool:
        sp = req.sampling
        if req.num_output_tokens >= sp.min_tokens and (
            token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids)
        ):
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token
            return True
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _finish(self, req: Request) -> dict | None:
        """Free (or hold, for a peer) a finished request's blocks. Returns transfer params, if any."""
        hold, params = False, None
        if self.connector is not None:
            hold, params = self.connector.request_finished(req, self.kv.block_ids(req.request_id))
        self._finished_ids.add(req.request_id)
        if hold:
            self.held[req.request_id] = req
        else:
            self.kv.free(req)
            self.requests.pop(req.request_id, None)
        return params

    def _output(self, req: Request, tokens: list[int], logprob: float | None = None) -> EngineOutput:
        return EngineOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            new_logprobs=[logprob] if logprob is not None else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            stop_reason=req.stop_reason,
        )

"""RouterBackend: the `Backend` the frontend calls in a deployment — discovery + policy + request plane.

generate(): candidates = live, ready workers of the request's model -> policy picks one -> stream
from it over a pooled connection. If the worker cannot take the request (unreachable, draining,
overloaded) before any output arrived, the next candidate is tried; once output has flowed, a worker
death surfaces as WorkerLostError (resuming on another worker is the fault-tolerance issue's job).
When the policy finds every worker past its busy limit (BusyError), the request waits in its pool's
`admission` queue if one is configured (bounded in size and time), else it gets a 503 at once.

announce(): a policy that does not read the prompt (round-robin, random, least-loaded) may pick as
the request reaches the frontend, before the chat template and tokenizer run; the worker is told
the request is coming (an `ExpectCall` notice), so an idle engine can wait for a whole turnover of
a closed loop's requests instead of prefilling the first alone (`tandem.engine.regroup`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from functools import partial
from itertools import repeat

import msgspec

from tandem.control.discovery import Discovery
from tandem.control.rpc_client import RpcClientPool
from tandem.protocol.errors import ModelNotFoundError, OverloadedError, WorkerLostError
from tandem.protocol.messages import EngineOutput, GenerateRequest
from tandem.protocol.registry import WorkerInfo
from tandem.protocol.rpc import ExpectCall, GenerateCall, merge_outputs
from tandem.router.admission import AdmissionQueue, AdmissionQueues
from tandem.router.basic import Policy, make_policy
from tandem.router.disagg import DisaggPolicy
from tandem.router.disagg_metrics import DisaggMetrics
from tandem.router.interface import ModelCard
from tandem.router.load_board import Load, LoadBoard
from tandem.router.policy import WorkerLoad
from tandem.transfer.release import release_hold

log = logging.getLogger(__name__)


class RouterBackend:
    def __init__(
        self,
        discovery: Discovery,
        policy: Policy | str = "round-robin",
        pool: RpcClientPool | None = None,
        *,
        max_attempts: int = 3,
        disagg: DisaggPolicy | None = None,
        admission: AdmissionQueues | None = None,
        board: LoadBoard | None = None,
    ) -> None:
        self.discovery = discovery
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.pool = pool or RpcClientPool()
        # Optional hooks of stateful policies (the KV router's): events over our pool, the live
        # worker set, and each request's first token and end (its load).
        bind = getattr(self.policy, "bind", None)
        if bind is not None:
            bind(self.pool)
        self._sync: Callable[[list[WorkerInfo]], None] | None = getattr(self.policy, "sync", None)
        self._on_first: Callable[[str], None] | None = getattr(self.policy, "on_first_token", None)
        self._on_finish: Callable[[str], None] | None = getattr(self.policy, "on_finish", None)
        self.max_attempts = max_attempts
        self.admission = admission
        self.disagg = disagg or DisaggPolicy()
        self.disagg_metrics = DisaggMetrics()
        self.in_flight: Counter[str] = Counter()
        self.board = board
        """Set when several frontends route to the same workers: their loads (`LoadBoard`)."""
        # A KV policy counts load in blocks: it publishes that too, and reads the other routers'.
        self._kv_load: Callable[[str], tuple[int, int]] | None = getattr(self.policy, "board_load", None)
        share = getattr(self.policy, "share_board", None)
        if board is not None and share is not None:
            share(board)
        self._cards: dict[str, ModelCard] = {}
        self._last_live: list[WorkerInfo] = []
        self._pick_early: Callable[[list[WorkerLoad]], str] | None = getattr(self.policy, "pick_early", None)
        self._reserved: dict[str, str] = {}
        """Request id -> the worker `announce` picked for it (counted in `in_flight` already)."""

    def models(self) -> list[ModelCard]:
        self._live()
        return list(self._cards.values())

    def is_ready(self, model: str) -> bool:
        return bool(self._candidates(model))

    def workers(self) -> list[WorkerInfo]:
        return self._live()

    def announce(self, model: str, request_id: str) -> None:
        """Pick the worker for `request_id` now, count it there, and tell the worker it is coming if
        its engine takes announcements (`WorkerInfo.takes_announcements`: a notice is a frame to
        write here and to read there, ~6% of a request's intake on this loop, so an engine that
        would drop it gets none). `generate` of the same request id then streams from it (if it is
        still a candidate); `withdraw` undoes a pick whose request never got that far. A no-op for
        policies that read the prompt, with an admission queue, and where prefill workers serve
        the model."""
        if self._pick_early is None or self.admission is not None:
            return
        workers = self._candidates(model)
        if not workers or any(w.role == "prefill" for w in workers):
            return
        chosen = self._pick_early(self._views(workers))
        self.in_flight[chosen] += 1
        self._publish(chosen)
        self._reserved[request_id] = chosen
        worker = next(w for w in workers if w.worker_id == chosen)
        if worker.takes_announcements:
            self.pool.notify(worker.address, ExpectCall(request_id))

    def withdraw(self, request_id: str) -> None:
        """The announced request will not be generated (refused, or its client left first)."""
        chosen = self._reserved.pop(request_id, None)
        if chosen is not None:
            self._uncount(request_id, chosen, None)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[EngineOutput]:
        workers = self._candidates(req.model)
        prefill = [w for w in workers if w.role == "prefill"]
        decode = [w for w in workers if w.role != "prefill"]
        mode = self.disagg.mode(
            len(req.prompt_token_ids), req.sampling.max_tokens, bool(prefill), bool(decode)
        )
        if mode == "refuse":
            raise OverloadedError(f"no live prefill worker for {req.model!r} and disaggregation is enforced")
        # `aclosing`: a caller that stops at the finish (the frontend) or leaves early closes the
        # inner stream now, not when the garbage collector gets to it.
        if mode == "local":
            candidates_of = partial(self._decode_candidates, req.model)
            async with aclosing(self._stream(req, candidates_of, "decode")) as local:
                async for out in local:
                    yield out
            return
        async with aclosing(self._disaggregated(req)) as disaggregated:
            async for out in disaggregated:
                yield out

    async def _disaggregated(self, req: GenerateRequest) -> AsyncGenerator[EngineOutput, None]:
        """Prefill on a prefill worker (one token, KV held), then decode where the KV is pulled."""
        prefill_req = msgspec.structs.replace(
            req,
            sampling=msgspec.structs.replace(req.sampling, max_tokens=1),
            kv_transfer_params={"do_remote_decode": True},
        )
        prefill_workers = partial(self._role_candidates, req.model, "prefill")
        decode_workers = partial(self._decode_candidates, req.model)
        first: EngineOutput | None = None
        sent = time.perf_counter()
        try:
            async with aclosing(self._stream(prefill_req, prefill_workers, "prefill")) as prefill:
                async for out in prefill:
                    if out.is_acceptance:
                        yield out  # a prefill worker has it: the frontend may open its stream
                        continue
                    first = out if first is None else merge_outputs(first, out)
        except (OverloadedError, WorkerLostError) as e:
            if self.disagg.enforce:
                raise
            self.disagg_metrics.fallbacks.inc()
            # Every prefill worker failed or refused: the decode worker prefills the prompt itself.
            log.warning(
                "request %s: remote prefill failed (%s); prefilling on a decode worker", req.request_id, e
            )
            async with aclosing(self._stream(req, decode_workers, "decode")) as fallback:
                async for out in fallback:
                    yield out
            return
        assert first is not None and first.finish_reason is not None, "a stream ends with a finish reason"
        self.disagg_metrics.prefill.observe(time.perf_counter() - sent)
        params = first.kv_transfer_params
        if first.finish_reason != "length" or params is None:
            # The first token ended the request (EOS / stop id) or the prompt could not be held.
            first.kv_transfer_params = None
            yield first
            return
        cached = first.num_cached_tokens
        decode_req = msgspec.structs.replace(
            req, kv_transfer_params=params, output_token_ids=list(first.new_token_ids)
        )
        finished = False
        try:
            yield EngineOutput(
                request_id=req.request_id,
                new_token_ids=first.new_token_ids,
                new_logprobs=first.new_logprobs,
                num_prompt_tokens=first.num_prompt_tokens,
                num_cached_tokens=cached,
                engine_ttft_s=first.engine_ttft_s,
            )
            sent = time.perf_counter()
            async with aclosing(self._stream(decode_req, decode_workers, "decode")) as decode:
                async for out in decode:
                    if out.is_acceptance:  # the stream is open already
                        continue
                    if sent:
                        self.disagg_metrics.handoff.observe(time.perf_counter() - sent)
                        sent = 0.0
                    out.num_cached_tokens = cached  # the client's cache hit is the prefill side's
                    finished = out.finish_reason is not None
                    yield out
        finally:
            if not finished:
                # The client left or the decode side failed, maybe before the KV was pulled: free
                # the prefill worker's hold now rather than at its timeout (a no-op if already read).
                await release_hold(params["remote_address"], params["remote_handle"])

    async def _stream(
        self, req: GenerateRequest, candidates_of: Callable[[], list[WorkerInfo]], pool: str
    ) -> AsyncGenerator[EngineOutput, None]:
        """Stream from one worker the policy picks among `candidates_of()` (the `pool`'s workers);
        retry elsewhere while no output has flowed."""
        tried: set[str] = set()
        last_error: Exception | None = None

        def place() -> WorkerInfo | None:
            """The worker the policy picks (None: no candidate left); BusyError if all are busy."""
            candidates = candidates_of()
            if tried:
                candidates = [w for w in candidates if w.worker_id not in tried]
            if not candidates:
                return None
            views = self._views(candidates)
            if self._sync is not None:
                self._sync(self._last_live)  # the snapshot `candidates_of` just read
            chosen = self.policy.pick(req, views)
            return next(w for w in candidates if w.worker_id == chosen)

        admission = None if self.admission is None else self.admission.pool(pool)
        accepted = False
        reserved = self._reserved.pop(req.request_id, None) if self._reserved else None
        for _ in range(self.max_attempts):
            worker = self._reserved_worker(req.request_id, reserved, candidates_of()) if reserved else None
            counted = worker is not None  # by `announce`
            reserved = None
            if worker is None:
                worker = place() if admission is None else await admission.place(place)
            if worker is None:
                break
            chosen = worker.worker_id
            tried.add(chosen)
            started = False
            if not counted:
                self.in_flight[chosen] += 1
                self._publish(chosen)
                counted = True
            try:
                stream = await self.pool.open(worker.address, GenerateCall(req))
                async with stream:
                    async for out in stream:
                        if out.is_acceptance:
                            # Not output yet (a failure after it is still retried elsewhere); only
                            # the first worker's is passed on, so the frontend can open its stream.
                            if not accepted:
                                accepted = True
                                yield out
                            continue
                        if not started:
                            started = True
                            if self._on_first is not None:
                                self._on_first(req.request_id)
                                self._publish(chosen)  # its prefill tokens are no longer queued
                            if admission is not None:
                                admission.notify()  # its prefill is done: queued tokens fell
                        if out.finish_reason is not None:
                            # Out of the counts before the client sees its end: the caller may
                            # never ask for more, and the client's next request must not be routed
                            # against this one (in a closed loop that put 9 and 7 requests on two
                            # workers, and split the batches each engine had kept together).
                            counted = False
                            self._uncount(req.request_id, chosen, admission)
                        yield out
                return
            except (WorkerLostError, OverloadedError) as e:
                if started:
                    raise
                log.warning(
                    "request %s: worker %s refused or unreachable (%s); trying another",
                    req.request_id,
                    chosen,
                    e,
                )
                last_error = e
            finally:
                if counted:
                    self._uncount(req.request_id, chosen, admission)
        if last_error is None and not self._known(req.model):
            raise ModelNotFoundError(f"the model {req.model!r} does not exist")
        raise OverloadedError(f"no live worker can serve {req.model!r} now") from last_error

    def _reserved_worker(
        self, request_id: str, chosen: str, candidates: list[WorkerInfo]
    ) -> WorkerInfo | None:
        """The worker `announce` picked, if it is still a candidate; else its count is dropped."""
        worker = next((w for w in candidates if w.worker_id == chosen), None)
        if worker is None:
            self._uncount(request_id, chosen, None)
        return worker

    def _uncount(self, request_id: str, worker_id: str, admission: AdmissionQueue | None) -> None:
        """A request has left `worker_id`: off the policy's and the router's load counts."""
        if self._on_finish is not None:
            self._on_finish(request_id)
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]
        self._publish(worker_id)
        if admission is not None:
            admission.notify()

    def _publish(self, worker_id: str) -> None:
        """Put this router's load on `worker_id` on the board the other frontends read."""
        if self.board is not None:
            self.board.write(worker_id, self._load_on(worker_id), self._loads)

    def _load_on(self, worker_id: str) -> Load:
        blocks, queued = self._kv_load(worker_id) if self._kv_load is not None else (0, 0)
        return (self.in_flight.get(worker_id, 0), blocks, queued)

    def _loads(self) -> dict[str, Load]:
        # A worker this router has nothing on carries none of its KV load either.
        return {w: self._load_on(w) for w in self.in_flight}

    async def close(self) -> None:
        close = getattr(self.policy, "close", None)
        if close is not None:
            await close()
        await self.pool.close()

    def _live(self) -> list[WorkerInfo]:
        workers = self._last_live = self.discovery.snapshot()
        # Remember every model seen, so a model whose workers are all gone answers "overloaded"
        # (retry later), not "does not exist".
        for w in workers:
            if w.model not in self._cards:
                self._cards[w.model] = ModelCard(w.model, w.model_dir, w.max_model_len)
        return workers

    def _candidates(self, model: str) -> list[WorkerInfo]:
        return [w for w in self._live() if w.model == model and w.status == "ready"]

    def _role_candidates(self, model: str, role: str) -> list[WorkerInfo]:
        return [w for w in self._candidates(model) if w.role == role]

    def _decode_candidates(self, model: str) -> list[WorkerInfo]:
        """Workers that generate: decode and aggregated ones (prefill workers only if nothing else)."""
        workers = self._candidates(model)
        return [w for w in workers if w.role != "prefill"] or workers

    def _known(self, model: str) -> bool:
        return model in self._cards

    def _views(self, candidates: list[WorkerInfo]) -> list[WorkerLoad]:
        # Active requests: this router's own in-flight count, exact and fresh. The worker's report
        # (every `load_interval`, up to ~1 s old) must not override it: right after a worker finishes
        # a batch of requests the report still shows them, and taking the larger of the two sent
        # that worker's replacements elsewhere, splitting batches that would prefill together. The
        # reported KV blocks still break ties. Several frontends on one host (`board`) add each
        # other's counts; routers without a board balance their own share.
        # One comprehension with locals: this runs per request over every candidate (1,000 workers).
        in_flight = self.in_flight
        others: Iterable[int] = (
            repeat(0) if self.board is None else self.board.others_requests([w.worker_id for w in candidates])
        )
        return [
            WorkerLoad(
                w.worker_id,
                w.load.num_used_blocks,
                0,
                in_flight[w.worker_id] + n,
                w.num_blocks,
                w.max_num_batched_tokens,
            )
            for w, n in zip(candidates, others, strict=False)
        ]

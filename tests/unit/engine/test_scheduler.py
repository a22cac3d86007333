from __future__ import annotations

import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.connector import ExternalMatch, FinishedTransfers, KVConnectorScheduler, KVConnectorWorker
from tandem.engine.core import EngineCore
from tandem.engine.request import Request, SamplingParams
from tandem.protocol.errors import InvalidRequestError
from tandem.protocol.kv_events import BlockRemoved, BlockStored
from tandem.protocol.registry import GAP_BUCKETS, LATENCY_BUCKETS
from tests.unit.engine.fakes import FakeExecutor

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def make_core(num_blocks=64, **cfg) -> tuple[EngineCore, FakeExecutor, list]:
    events: list = []
    ex = FakeExecutor(num_blocks)
    core = EngineCore(EngineConfig(block_size=4, **cfg), ex, event_sink=events.extend)
    return core, ex, events


def run(core: EngineCore, max_steps: int = 10_000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            return out
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


def test_continuous_batching_runs_all_requests_to_max_tokens():
    core, _, _ = make_core()
    for i in range(5):
        core.add_request(list(range(1, 10 + i)), GREEDY, request_id=f"r{i}")
    out = run(core)
    assert {k: len(v) for k, v in out.items()} == {f"r{i}": 8 for i in range(5)}
    assert core.kv.num_used_blocks == 0


def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    core, ex, _ = make_core(max_num_batched_tokens=16)
    core.add_request(list(range(1, 51)), SamplingParams(max_tokens=2, temperature=0), request_id="a")
    run(core)
    sizes = [s.scheduled[0].num_new_tokens for s in ex.steps if s.scheduled]
    assert sizes == [16, 16, 16, 2, 1], "50 prompt tokens in 16-token chunks, then one decode"


def test_budget_is_shared_between_decodes_and_a_new_prefill():
    core, ex, _ = make_core(max_num_batched_tokens=10)
    core.add_request([1, 2, 3], SamplingParams(max_tokens=5, temperature=0), request_id="short")
    core.step()
    core.add_request(list(range(1, 40)), SamplingParams(max_tokens=1, temperature=0), request_id="long")
    core.step()
    step = ex.steps[-1]
    assert [(s.request.request_id, s.num_new_tokens) for s in step.scheduled] == [("short", 1), ("long", 9)]


def test_a_steps_first_tokens_come_before_its_decode_tokens():
    # The frontend streams a step's outputs in this order: a first token must not wait behind
    # the batch's decode tokens. A chunked prompt's partial step emits nothing.
    core, _, _ = make_core(max_num_batched_tokens=24)
    for rid in ("d1", "d2"):
        core.add_request([1, 2, 3], SamplingParams(max_tokens=6, temperature=0), request_id=rid)
    core.step()
    core.add_request([4, 5, 6], SamplingParams(max_tokens=6, temperature=0), request_id="new")
    core.add_request(list(range(1, 40)), SamplingParams(max_tokens=6, temperature=0), request_id="long")
    outs = core.step()
    assert [o.request_id for o in outs] == ["new", "d1", "d2"]
    outs = core.step()
    assert [o.request_id for o in outs] == ["long", "d1", "d2", "new"]


def test_the_first_token_carries_the_engines_own_time_to_it():
    # The frontend's per-request timing reads it: the engine's queue and prefill of that request.
    core, _, _ = make_core()
    core.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=4, temperature=0), request_id="a")
    outs = []
    while core.has_unfinished():
        outs.extend(core.step())
    phases = core.scheduler.phases
    assert outs[0].engine_ttft_s > 0
    assert outs[0].engine_ttft_s == pytest.approx(phases.queue.sum + phases.prefill.sum)
    assert [o.engine_ttft_s for o in outs[1:]] == [0.0] * 3


def test_prefix_hit_skips_cached_tokens_but_leaves_the_last_token():
    core, _, _ = make_core()
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks of 4
    core.add_request(prompt, GREEDY, request_id="first")
    first = run(core)
    core.add_request(prompt, GREEDY, request_id="again")
    core.add_request(prompt[:16], GREEDY, request_id="exact-blocks")
    outs: list = []
    while core.has_unfinished():
        outs.extend(core.step())
    cached = {o.request_id: o.num_cached_tokens for o in outs}
    assert cached["again"] == 16
    assert cached["exact-blocks"] == 12, "a fully cached prompt still computes its last block"
    again = [t for o in outs if o.request_id == "again" for t in o.new_token_ids]
    assert again == first["first"], "a prefix hit must not change the output"


def test_preemption_recomputes_and_loses_nothing():
    prompts = [list(range(i, i + 11)) for i in range(1, 7)]
    sp = SamplingParams(max_tokens=20, temperature=0.0)
    roomy, _, _ = make_core(num_blocks=128)
    for i, p in enumerate(prompts):
        roomy.add_request(p, sp, request_id=f"r{i}")
    expected = run(roomy)

    tight, _, _ = make_core(num_blocks=12)
    for i, p in enumerate(prompts):
        tight.add_request(p, sp, request_id=f"r{i}")
    got = run(tight)
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.kv.num_used_blocks == 0


def test_max_num_seqs_caps_the_running_set():
    core, ex, _ = make_core(max_num_seqs=2)
    for i in range(4):
        core.add_request([1, 2, 3, i + 4], GREEDY, request_id=f"r{i}")
    run(core)
    assert max(len(s.scheduled) for s in ex.steps) == 2


def test_fcfs_admission_order():
    core, ex, _ = make_core(max_num_seqs=1)
    for i in range(3):
        core.add_request([i + 1] * 5, SamplingParams(max_tokens=1, temperature=0), request_id=f"r{i}")
    run(core)
    order = [s.scheduled[0].request.request_id for s in ex.steps if s.scheduled]
    assert order == ["r0", "r1", "r2"]


def test_stop_on_eos_stop_ids_and_context_length():
    core, ex, _ = make_core()
    ex.eos_token_ids = ()
    req = core.add_request([1, 2, 3], SamplingParams(max_tokens=50, temperature=0), request_id="x")
    out = run(core)
    assert len(out["x"]) == 50 and req.finish_reason == "length"

    core2, _, _ = make_core()
    probe = run_first_token([1, 2, 3])
    req2 = core2.add_request(
        [1, 2, 3], SamplingParams(max_tokens=50, stop_token_ids=(probe,)), request_id="y"
    )
    out2 = run(core2)
    assert out2["y"] == [probe] and req2.finish_reason == "stop" and req2.stop_reason == probe

    ex3 = FakeExecutor(64, max_model_len=10)
    core3 = EngineCore(EngineConfig(block_size=4), ex3)
    req3 = core3.add_request([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=50))
    run(core3)
    assert req3.num_tokens == 10 and req3.finish_reason == "length"


def run_first_token(prompt: list[int]) -> int:
    core, _, _ = make_core()
    core.add_request(prompt, SamplingParams(max_tokens=1, temperature=0), request_id="p")
    return run(core)["p"][0]


def test_abort_frees_blocks_and_reports_abort():
    core, _, _ = make_core()
    core.add_request(list(range(1, 30)), SamplingParams(max_tokens=100), request_id="a")
    core.step()
    assert core.kv.num_used_blocks > 0
    assert core.abort("a")
    outs = core.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
    assert core.kv.num_used_blocks == 0 and not core.has_unfinished()
    assert not core.abort("a")


def test_events_stored_then_removed_in_order():
    core, _, events = make_core(num_blocks=4)
    core.add_request(list(range(1, 10)), SamplingParams(max_tokens=1), request_id="a")
    run(core)
    core.add_request(list(range(100, 113)), SamplingParams(max_tokens=1), request_id="b")
    run(core)
    ids = [e.event_id for e in events]
    assert ids == list(range(len(ids)))
    kinds = [type(e) for e in events]
    assert kinds[0] is BlockStored and BlockRemoved in kinds
    first_stored = events[0]
    assert first_stored.parent_hash is None and len(first_stored.block_hashes) == 2
    removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert removed <= set(first_stored.block_hashes)


def test_bad_requests_are_refused_with_clear_messages():
    core, _, _ = make_core()
    with pytest.raises(InvalidRequestError, match="empty"):
        core.add_request([], GREEDY)
    small = EngineCore(EngineConfig(block_size=4), FakeExecutor(64, max_model_len=8))
    with pytest.raises(InvalidRequestError, match="8 tokens but the context length is 8"):
        small.add_request(list(range(8)), GREEDY)
    with pytest.raises(InvalidRequestError, match=r"\[0, 1000\)"):
        core.add_request([5, 5000], GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


class _PeerConnector(KVConnectorScheduler, KVConnectorWorker):
    """Claims a request's first `n` tokens come from a peer and holds finished blocks for one step."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.allocated: dict[str, tuple[list[int], int]] = {}
        self.pending_send: set[str] = set()

    def get_num_new_matched_tokens(self, request: Request, num_local_tokens: int) -> ExternalMatch:
        return ExternalMatch(num_tokens=max(0, self.n - num_local_tokens))

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        self.allocated[request.request_id] = (list(block_ids), num_external_tokens)

    def build_meta(self):
        return dict(self.allocated)

    def request_finished(self, request, block_ids):
        self.pending_send.add(request.request_id)
        return True, {"blocks": list(block_ids)}

    def start_load_kv(self, meta) -> None:
        pass

    def save_kv(self, meta) -> None:
        pass

    def get_finished(self) -> FinishedTransfers:
        done, self.pending_send = self.pending_send, set()
        return FinishedTransfers(sending=done)


def test_connector_supplies_leading_tokens_and_holds_blocks_for_a_peer():
    conn = _PeerConnector(n=8)
    ex = FakeExecutor(64)
    core = EngineCore(EngineConfig(block_size=4), ex, connector=(conn, conn))
    req = core.add_request(list(range(1, 13)), SamplingParams(max_tokens=1), request_id="d")
    outs = core.step()
    first = ex.steps[0].scheduled[0]
    assert (first.start, first.num_new_tokens) == (8, 4), "the 8 external tokens are not recomputed"
    assert req.num_cached_tokens == 8
    assert conn.allocated["d"][1] == 8
    assert outs[0].kv_transfer_params == {"blocks": conn.allocated["d"][0]}
    assert core.kv.num_used_blocks == 0, "the peer reported the blocks read, so they are free"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def _admitted(ex: FakeExecutor) -> list[str]:
    """Ids whose prompt the last step started."""
    step = ex.steps[-1]
    return sorted(s.request.request_id for s in step.scheduled if s.start == 0)


def test_delay_factor_batches_arrivals_into_one_prefill_step_while_decoding():
    ex = FakeExecutor(64)
    clock = ex.clock = _Clock()  # the core times the delay on the executor's clock, as the sim's
    core = EngineCore(EngineConfig(block_size=4, scheduler_delay_factor=1.0), ex)
    core.add_request([1, 2, 3, 4, 5], GREEDY, request_id="a")
    core.step()  # t=0: nothing decoding, so the prompt starts at once
    assert _admitted(ex) == ["a"]
    clock.t = 10.0  # that prompt step took 10 s
    core.step()
    core.add_request([6, 7, 8], GREEDY, request_id="b")
    clock.t = 12.0
    core.step()
    assert _admitted(ex) == [], "b waited 2 s < 1.0 x 10 s: a decodes alone"
    core.add_request([9, 10, 11], GREEDY, request_id="c")
    clock.t = 20.0
    core.step()
    assert _admitted(ex) == ["b", "c"], "both arrivals share one prefill step"
    assert set(run(core)) >= {"a", "b", "c"}


def test_without_delay_factor_or_decodes_prompts_start_at_once():
    core, ex, _ = make_core()
    core.add_request([1, 2, 3], GREEDY, request_id="a")
    core.step()
    core.add_request([4, 5, 6], GREEDY, request_id="b")
    core.step()
    assert _admitted(ex) == ["b"]
    core, ex, _ = make_core(scheduler_delay_factor=5.0)
    core.add_request([1, 2, 3], GREEDY, request_id="a")
    core.step()
    assert _admitted(ex) == ["a"], "an idle engine never waits"


def test_delay_factor_is_validated():
    with pytest.raises(ValueError, match="scheduler_delay_factor"):
        EngineConfig(scheduler_delay_factor=-1)


def test_stats_count_prefill_steps_and_their_batch():
    core, _, _ = make_core(max_num_batched_tokens=16)
    core.add_request(list(range(1, 51)), SamplingParams(max_tokens=2, temperature=0), request_id="a")
    run(core)
    core.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0), request_id="b")
    core.add_request([4, 5, 6], SamplingParams(max_tokens=3, temperature=0), request_id="c")
    run(core)
    s = core.stats()
    # a: 50 tokens in 16-token chunks (4 prefill steps), then b and c start in one step.
    assert (s.prefill_steps, s.prefill_requests_total) == (5, 6)
    assert s.num_steps == 5 + 1 + 2, "one decode step for a, two for b and c"


class _TimedExecutor(FakeExecutor):
    """Each step takes `step_s` on `clock`, as a real or simulated device's would."""

    def __init__(self, num_blocks: int, step_s: float) -> None:
        super().__init__(num_blocks)
        self.clock = _Clock()
        self.step_s = step_s

    def execute(self, out):  # type: ignore[no-untyped-def]
        self.clock.t += self.step_s
        return super().execute(out)


def test_stats_split_each_request_into_queue_prefill_and_decode_time():
    ex = _TimedExecutor(64, step_s=2.0)
    core = EngineCore(EngineConfig(block_size=4), ex)
    core.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), request_id="a")  # at t=0
    ex.clock.t = 1.0  # the engine takes it 1 s later
    # b was handed over 0.5 s before the engine took it in (the worker stamps it, as AsyncEngine does)
    core.add_request([4, 5], SamplingParams(max_tokens=2, temperature=0), request_id="b", arrival_time=0.5)
    assert set(run(core)) == {"a", "b"}
    s = core.stats()
    # Both start at t=1 (queues 1 s and 0.5 s), get their first token at t=3 (prefill 2 s each),
    # then one token per 2 s step: a 3 more, b 1 more.
    assert (s.queued_requests_total, s.queue_seconds_total) == (2, pytest.approx(1.5))
    assert (s.first_tokens_total, s.prefill_seconds_total) == (2, pytest.approx(4.0))
    assert (s.decode_tokens_total, s.decode_seconds_total) == (4, pytest.approx(8.0))
    # The same as histograms, over the protocol's buckets (a bucket counts values <= its bound).
    assert _nonzero(s.queue_buckets, LATENCY_BUCKETS) == {0.5: 1, 1.0: 1}
    assert _nonzero(s.prefill_buckets, LATENCY_BUCKETS) == {2.5: 2}
    assert _nonzero(s.decode_buckets, GAP_BUCKETS) == {2.5: 4}


def _nonzero(counts: tuple[int, ...], bounds: tuple[float, ...]) -> dict[float, int]:
    assert len(counts) == len(bounds) + 1
    return {b: c for b, c in zip((*bounds, float("inf")), counts, strict=True) if c}


def test_a_preempted_request_is_queued_once_and_its_recompute_is_decode_time():
    ex = _TimedExecutor(4, step_s=1.0)  # 4 blocks of 4 tokens: two requests cannot both grow
    core = EngineCore(EngineConfig(block_size=4), ex)
    for rid in ("a", "b"):
        core.add_request(list(range(1, 7)), SamplingParams(max_tokens=6, temperature=0), request_id=rid)
    assert set(run(core)) == {"a", "b"}
    s = core.stats()
    assert core.scheduler.num_preemptions > 0, "the scenario must preempt"
    assert s.queued_requests_total == 2 and s.first_tokens_total == 2
    assert s.decode_tokens_total == 2 * 5, "every later token counted once, recomputes included"

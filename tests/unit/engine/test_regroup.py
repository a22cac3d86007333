"""The regroup hold (`EngineConfig.regroup_steps`): when a batch that ended together comes back as
new requests one by one, an idle engine prefills them in one step instead of starting the first
alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.connector import ExternalMatch, FinishedTransfers, KVConnectorScheduler, KVConnectorWorker
from tandem.engine.core import EngineCore
from tandem.engine.executor import ExecutorOutput, SchedulerOutput
from tandem.engine.request import Request, SamplingParams
from tandem.engines.sim.executor import SimExecutor
from tandem.engines.sim.timing import StepShape
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tests.unit.engine.fakes import FakeExecutor

TWO = SamplingParams(max_tokens=2, ignore_eos=True)  # a prefill step, then a decode step ends it


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class _TimedExecutor(FakeExecutor):
    """Every step lasts 10 s on a clock the test moves (the scheduler reads the executor's clock)."""

    def __init__(self) -> None:
        super().__init__(64)
        self.clock = _Clock()

    def execute(self, out: SchedulerOutput) -> ExecutorOutput:
        result = super().execute(out)
        self.clock.t += 10.0
        return ExecutorOutput(sampled=result.sampled, step_seconds=10.0)


def _prompts_started(ex: FakeExecutor) -> list[str]:
    return sorted(s.request.request_id for s in ex.steps[-1].scheduled if s.start == 0)


def _finished_batch(
    steps: float = 0.5, window: float = 1.0, expect: float = 0.0, size: int = 2, pace: float = 0.0
) -> tuple[EngineCore, _TimedExecutor]:
    """An engine whose `size` requests have just finished in one step, at t=20 (hold limit: `steps` x
    the 10 s decode step; finishes count up to `window` x 10 s before the oldest waiting prompt;
    `expect` x 10 s: the limit while announced prompts complete the turnover; `pace` x 10 s: the
    limit while the missing prompts are due by then at the pace the others came)."""
    ex = _TimedExecutor()
    config = EngineConfig(
        block_size=4,
        regroup_steps=steps,
        regroup_window_steps=window,
        regroup_expect_steps=expect,
        regroup_pace_steps=pace,
    )
    core = EngineCore(config, ex)
    for rid in "abcdefgh"[:size]:
        core.add_request([1, 2, 3, 4, 5], TWO, request_id=rid)
    core.step()  # t 0 -> 10: both prefill
    done = core.step()  # t 10 -> 20: both decode their last token
    assert {o.request_id for o in done if o.finish_reason} == set("abcdefgh"[:size]) and ex.clock.t == 20.0
    return core, ex


def _arrive(core: EngineCore, ex: _TimedExecutor, t: float, *rids: str) -> None:
    ex.clock.t = t
    for rid in rids:
        core.add_request([6, 7, 8], TWO, request_id=rid)


def _held(core: EngineCore, ex: _TimedExecutor) -> bool:
    """One step; True if it ran nothing (the waiting prompts were held)."""
    steps = len(ex.steps)
    core.step()
    return len(ex.steps) == steps


def _held_until_26(core: EngineCore, ex: _TimedExecutor, started: list[str]) -> None:
    """Still held at 25.9; at 26 (the oldest at 21 plus the 5 s limit) `started` prefill."""
    ex.clock.t = 25.9
    assert _held(core, ex)
    ex.clock.t = 26.0
    assert not _held(core, ex)
    assert _prompts_started(ex) == started


def test_replacements_that_arrive_one_by_one_prefill_together() -> None:
    core, ex = _finished_batch()
    _arrive(core, ex, 21.0, "c")
    assert _held(core, ex)
    assert core.seconds_held() == pytest.approx(5.0)  # c may wait until 21 + 0.5 x 10 s
    _arrive(core, ex, 23.0, "d")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["c", "d"]
    assert core.seconds_held() is None


def test_the_hold_ends_at_the_limit() -> None:
    core, ex = _finished_batch()
    _arrive(core, ex, 21.0, "c")
    ex.clock.t = 25.9
    assert _held(core, ex)
    ex.clock.t = 26.0  # c has waited 0.5 x the last decode step: it starts alone
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["c"]


def test_the_hold_counts_from_the_first_arrival_not_from_now() -> None:
    # c comes 4 s after the batch ended; by t=27 the finishes are 7 s old, past the limit, but c may
    # still wait until 24 + 5, and d, late, joins it.
    core, ex = _finished_batch()
    _arrive(core, ex, 24.0, "c")
    ex.clock.t = 27.0
    assert _held(core, ex)
    _arrive(core, ex, 28.0, "d")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["c", "d"]


def test_a_replacement_later_than_the_limit_still_counts_within_the_window() -> None:
    # c comes 8 s after the batch ended (the client and frontend were slow): past the 5 s limit, but
    # within the 10 s window, so b's replacement is still expected until 28 + 5.
    core, ex = _finished_batch()
    _arrive(core, ex, 28.0, "c")
    assert _held(core, ex)
    assert core.seconds_held() == pytest.approx(5.0)
    _arrive(core, ex, 31.0, "d")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["c", "d"]


def test_no_hold_without_reason() -> None:
    # As many arrived as finished: start at once.
    core, ex = _finished_batch()
    _arrive(core, ex, 21.0, "c", "d")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["c", "d"]
    # The finishes are older than the window: nothing is expected any more.
    core, ex = _finished_batch()
    _arrive(core, ex, 30.5, "c")
    assert not _held(core, ex)
    # Switched off.
    core, ex = _finished_batch(steps=0.0)
    _arrive(core, ex, 21.0, "c")
    assert not _held(core, ex)


def _three_of_four_came_2s_apart() -> tuple[EngineCore, _TimedExecutor]:
    """Four finished at 20 (limit 5 s, pace limit 10 s); replacements came at 21, 23 and 25."""
    core, ex = _finished_batch(size=4, pace=1.0)
    for t, rid in ((21.0, "w"), (23.0, "x"), (25.0, "y")):
        _arrive(core, ex, t, rid)
    return core, ex


def test_the_limit_stretches_while_the_rest_of_the_turnover_is_due_at_its_pace() -> None:
    # At the pace of the three that came, the fourth is due by 29 (one gap late), within the pace
    # limit after the oldest (31): the hold runs past the 5 s limit (26) until 29, and all four
    # prefill together.
    core, ex = _three_of_four_came_2s_apart()
    ex.clock.t = 26.0
    assert _held(core, ex)
    assert core.seconds_held() == pytest.approx(3.0)
    _arrive(core, ex, 27.5, "z")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["w", "x", "y", "z"]


def test_the_stretched_hold_ends_when_the_missing_prompt_is_overdue() -> None:
    core, ex = _three_of_four_came_2s_apart()
    ex.clock.t = 28.9
    assert _held(core, ex)
    ex.clock.t = 29.0  # the fourth went elsewhere, or its client left
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["w", "x", "y"]


def test_no_stretch_for_a_turnover_not_due_within_the_pace_limit() -> None:
    # Eight finished; two came 3 s apart: the other six are due at 24 + 7 x 3 = 45, past 21 + 10.
    core, ex = _finished_batch(size=8, pace=1.0)
    _arrive(core, ex, 21.0, "w")
    _arrive(core, ex, 24.0, "x")
    _held_until_26(core, ex, started=["w", "x"])


def test_no_stretch_from_a_single_arrival_or_when_the_pace_limit_is_not_longer() -> None:
    core, ex = _finished_batch(size=2, pace=1.0)
    _arrive(core, ex, 21.0, "w")  # one prompt: no pace to tell
    ex.clock.t = 26.0
    assert not _held(core, ex)
    core, ex = _finished_batch(size=4, pace=0.5)  # the pace limit is the short limit
    _arrive(core, ex, 21.0, "w")
    _arrive(core, ex, 22.0, "x")
    _arrive(core, ex, 23.0, "y")
    ex.clock.t = 26.0
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["w", "x", "y"]


def _announce(core: EngineCore, ex: _TimedExecutor, t: float, *rids: str) -> None:
    ex.clock.t = t
    for rid in rids:
        core.scheduler.expect(rid)


def test_announced_replacements_are_waited_for_past_the_short_limit() -> None:
    # c arrives at 21; d, its batch's other replacement, is announced at 23 (a router picked this
    # worker as d reached the frontend) but is still being tokenized at 26, past the 5 s limit: c
    # waits for it, up to 21 + 2 x 10 s, and the two prefill together.
    core, ex = _finished_batch(expect=2.0)
    _arrive(core, ex, 21.0, "x")
    _announce(core, ex, 23.0, "y")
    ex.clock.t = 26.0
    assert _held(core, ex)
    assert core.seconds_held() == pytest.approx(15.0)
    _arrive(core, ex, 34.0, "y")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["x", "y"]
    assert core.scheduler.regroup.num_expected == 0


def test_an_announced_prompt_that_never_comes_is_waited_for_until_the_long_limit_only() -> None:
    core, ex = _finished_batch(expect=2.0)
    _arrive(core, ex, 21.0, "x")
    _announce(core, ex, 22.0, "y")  # then refused by the frontend, say: it never arrives
    ex.clock.t = 40.9
    assert _held(core, ex)
    ex.clock.t = 41.0
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["x"]
    # Forgotten once older than the long limit: it holds no later turnover.
    assert core.scheduler.regroup.num_expected == 0


def test_no_longer_hold_when_the_announced_prompt_is_not_due_within_the_short_limit() -> None:
    # Announced prompts have lately taken 4 s to arrive: y, announced at 23, is due at 27, past the
    # 5 s limit from x (26). The turnover is not about to be whole, so x starts at 26 as without y.
    core, ex = _finished_batch(expect=2.0)
    core.scheduler.regroup.lag = 4.0
    _arrive(core, ex, 21.0, "x")
    _announce(core, ex, 23.0, "y")
    _held_until_26(core, ex, started=["x"])


def test_the_lag_is_learned_from_announced_arrivals() -> None:
    core, ex = _finished_batch(expect=2.0)
    _announce(core, ex, 21.0, "x")
    _arrive(core, ex, 23.0, "x")
    assert core.scheduler.regroup.lag == pytest.approx(2.0)
    _announce(core, ex, 23.0, "y")
    _arrive(core, ex, 29.0, "y")
    assert core.scheduler.regroup.lag == pytest.approx(3.0)  # moving average, newest weighs 1/4


def test_no_longer_hold_for_a_turnover_not_in_sight() -> None:
    # Four finished; one arrived and two announced make three: the fourth has not reached the
    # frontend yet (a c=64 turnover comes in over 20-80 ms). Only the short limit applies.
    core, ex = _finished_batch(expect=2.0, size=4)
    _arrive(core, ex, 21.0, "w")
    _announce(core, ex, 22.0, "x", "y")
    _held_until_26(core, ex, started=["w"])


def test_an_announcement_widens_the_window_in_which_finishes_count() -> None:
    # x comes 12 s after the batch ended, past the 10 s window, so alone it would start at once;
    # y announced means the whole turnover (two) is in sight within the 20 s long limit.
    core, ex = _finished_batch(expect=2.0)
    _announce(core, ex, 31.0, "y")
    _arrive(core, ex, 32.0, "x")
    assert _held(core, ex)
    _arrive(core, ex, 35.0, "y")
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["x", "y"]


def test_announcements_are_ignored_when_switched_off() -> None:
    core, ex = _finished_batch()  # regroup_expect_steps 0
    _arrive(core, ex, 21.0, "x")
    _announce(core, ex, 22.0, "y")
    assert core.scheduler.regroup.num_expected == 0
    ex.clock.t = 26.0
    assert not _held(core, ex)
    assert _prompts_started(ex) == ["x"]


class _HandsOff(KVConnectorScheduler, KVConnectorWorker):
    """A prefill side: every finished request's blocks are held for a peer (then read at once)."""

    def __init__(self) -> None:
        self.sending: set[str] = set()

    def get_num_new_matched_tokens(self, request: Request, num_local_tokens: int) -> ExternalMatch:
        return ExternalMatch()

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external: int) -> None:
        pass

    def build_meta(self) -> None:
        return None

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any]]:
        self.sending.add(request.request_id)
        return True, {"blocks": list(block_ids)}

    def start_load_kv(self, meta: Any) -> None:
        pass

    def save_kv(self, meta: Any) -> None:
        pass

    def get_finished(self) -> FinishedTransfers:
        done, self.sending = self.sending, set()
        return FinishedTransfers(sending=done)


def test_requests_handed_to_a_peer_are_not_waited_for() -> None:
    # A prefill worker's finished requests go on to a decode worker: no replacement follows them.
    conn = _HandsOff()
    ex = _TimedExecutor()
    core = EngineCore(EngineConfig(block_size=4, regroup_steps=0.5), ex, connector=(conn, conn))
    for rid in ("a", "b"):
        core.add_request([1, 2, 3, 4, 5], TWO, request_id=rid)
    core.step()
    done = core.step()
    assert all(o.kv_transfer_params for o in done)
    _arrive(core, ex, 21.0, "c")
    assert not _held(core, ex)


def test_no_hold_while_requests_decode() -> None:
    ex = _TimedExecutor()
    core = EngineCore(EngineConfig(block_size=4), ex)
    core.add_request([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True), request_id="long")
    for rid in ("a", "b"):
        core.add_request([1, 2, 3, 4, 5], TWO, request_id=rid)
    core.step()
    core.step()  # a and b end; long decodes on
    core.add_request([6, 7, 8], TWO, request_id="c")
    core.step()
    assert _prompts_started(ex) == ["c"]  # the delay factor's business, off by default


def test_regroup_steps_are_validated() -> None:
    with pytest.raises(ValueError, match="regroup_steps"):
        EngineConfig(regroup_steps=-0.1)
    with pytest.raises(ValueError, match="regroup_window_steps"):
        EngineConfig(regroup_window_steps=101)
    with pytest.raises(ValueError, match="regroup_pace_steps"):
        EngineConfig(regroup_pace_steps=-1)
    with pytest.raises(ValueError, match="regroup_expect_steps"):
        EngineConfig(regroup_expect_steps=-1)


class _FixedTiming:
    def step_ms(self, shape: StepShape) -> float:
        return 40.0


def _generate(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, "m", [1, 2, 3, 4, 5], SamplingSpec(max_tokens=2, ignore_eos=True))


async def test_engine_thread_waits_out_the_hold_and_merges_late_arrivals() -> None:
    """Live: a real-clock simulated engine (40 ms steps; by default the hold lasts at most 2 of them)."""
    config = EngineConfig(block_size=4, num_blocks=64)
    engine = AsyncEngine(EngineCore(config, SimExecutor(None, config, timing=_FixedTiming())))

    async def run(rid: str) -> int:
        return sum([len(o.new_token_ids) async for o in engine.submit(_generate(rid))])

    try:
        assert await asyncio.gather(run("a"), run("b")) == [2, 2]
        before = engine.stats
        first = asyncio.ensure_future(run("c"))
        await asyncio.sleep(0.005)  # the second replacement comes 5 ms after the first
        assert await asyncio.gather(first, run("d")) == [2, 2]
        after = engine.stats
        assert after.prefill_steps - before.prefill_steps == 1
        assert after.prefill_requests_total - before.prefill_requests_total == 2
        # A lone replacement (the other never comes) starts once the hold is over.
        assert await asyncio.wait_for(run("e"), 5.0) == 2
    finally:
        engine.shutdown()

"""Step timing of the simulated engine: Dynamo's pass model, and the profile-table model."""

from __future__ import annotations

import json
import time

import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import SamplingParams
from tandem.engines.sim.clock import VirtualClock
from tandem.engines.sim.executor import SimExecutor
from tandem.engines.sim.timing import PolynomialTiming, ProfileTiming, StepShape

POLY = PolynomialTiming()
CAPACITY = 64 * 16  # blocks * block size of `make_core`


def prefill(t: float) -> float:
    return 4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142


def decode(u: float) -> float:
    return max(1.0, -25.74 * u * u + 54.01 * u + 5.74)


def make_core(speedup: float = 1.0, budget: int = 256) -> tuple[EngineCore, VirtualClock]:
    clock = VirtualClock()
    config = EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=budget)
    return EngineCore(config, SimExecutor(None, config, clock=clock, speedup=speedup)), clock


def add(core: EngineCore, n: int, out: int, first: int = 1) -> None:
    core.add_request(list(range(first, first + n)), SamplingParams(max_tokens=out, ignore_eos=True))


def test_polynomial_parts() -> None:
    assert POLY.step_ms(StepShape(1000, 0, 0.5)) == pytest.approx(prefill(1000))
    assert POLY.step_ms(StepShape(0, 3, 0.0, 300, 1000)) == pytest.approx(decode(0.3))
    mixed = StepShape(1000, 3, 0.9, 300, 1000)
    assert POLY.step_ms(mixed) == pytest.approx(prefill(1000) + decode(0.3))
    assert POLY.step_ms(StepShape(0, 1, 0.0, 5000, 1000)) == pytest.approx(decode(1.0))  # u clamps at 1
    assert POLY.step_ms(StepShape(0, 0, 0.0)) == 0.0


def test_dynamo_integer_mean_prefill_count() -> None:
    # Three prompts of 3000, 3000 and a 2192-token chunk: Dynamo counts 3 * (8192 // 3) = 8190.
    shape = StepShape(8192, 0, 0.0, num_prefills=3, prefill_start_tokens=0)
    assert POLY.step_ms(shape) == pytest.approx(prefill(8190))
    assert PolynomialTiming(integer_mean_batching=False).step_ms(shape) == pytest.approx(prefill(8192))


def test_prefill_only_step() -> None:
    core, clock = make_core()
    add(core, 100, 1)
    core.step()
    assert clock.now() * 1000 == pytest.approx(prefill(100))


def test_decode_step_uses_logical_context_of_decoding_requests() -> None:
    core, clock = make_core()
    add(core, 100, 3)
    core.step()  # prefill; the first token comes with it, no decode time
    t0 = clock.now()
    core.step()  # decode with context 101 tokens
    assert (clock.now() - t0) * 1000 == pytest.approx(decode(101 / CAPACITY))


def test_mixed_step_adds_prefill_and_decode() -> None:
    core, clock = make_core()
    add(core, 100, 5)
    core.step()
    add(core, 50, 2, first=500)
    t0 = clock.now()
    core.step()  # request 1 decodes (context 101) while request 2 prefills 50 tokens
    assert (clock.now() - t0) * 1000 == pytest.approx(prefill(50) + decode(101 / CAPACITY))


def test_chunked_prefill_sums_chunk_steps() -> None:
    core, clock = make_core(budget=64)
    add(core, 100, 1)
    outs = core.step() + core.step()
    assert [len(o.new_token_ids) for o in outs] == [1]
    assert clock.now() * 1000 == pytest.approx(prefill(64) + prefill(36))


def test_speedup_divides_step_time() -> None:
    fast, fast_clock = make_core(speedup=10.0)
    slow, slow_clock = make_core()
    for core in (fast, slow):
        add(core, 100, 4)
        while core.has_unfinished():
            core.step()
    assert fast_clock.now() == pytest.approx(slow_clock.now() / 10.0)


def test_virtual_clock_runs_ten_simulated_minutes_fast() -> None:
    core, clock = make_core(speedup=0.005)  # 200x slower steps: ~18 simulated minutes
    for i in range(40):
        add(core, 60, 40, first=1 + i)
    started = time.perf_counter()
    while core.has_unfinished():
        core.step()
    assert clock.now() > 600.0
    assert time.perf_counter() - started < 1.0


def test_profile_timing_interpolates(tmp_path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(
            {
                "prefill": {"tokens": [100, 1100], "ms": [10.0, 20.0]},
                "decode": {"batch_size": [1, 11], "kv_usage": [0.0, 1.0], "ms": [[5.0, 10.0], [7.0, 12.0]]},
            }
        )
    )
    t = ProfileTiming.from_json(path)
    assert t.prefill_ms(600) == pytest.approx(15.0)
    assert t.prefill_ms(2100) == pytest.approx(30.0)  # extended past the last point
    assert t.decode_ms(6, 0.5) == pytest.approx(8.5)  # bilinear
    assert t.decode_ms(50, 2.0) == pytest.approx(12.0)  # clamped at the grid's edge
    assert t.step_ms(StepShape(600, 6, 0.0, 512, 1024)) == pytest.approx(15.0 + 8.5)


def test_profile_timing_batch_only_and_validation() -> None:
    t = ProfileTiming.from_dict(
        {"prefill": {"tokens": [0, 1000], "ms": [0.0, 10.0]}, "decode": {"batch_size": [1, 3], "ms": [4, 6]}}
    )
    assert t.decode_ms(2, 0.9) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        ProfileTiming.from_dict(
            {"prefill": {"tokens": [5, 1], "ms": [1, 2]}, "decode": {"batch_size": [1], "ms": [1]}}
        )


class _FixedTiming:
    """Every step takes `ms` (at speed-up 1)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def step_ms(self, shape: StepShape) -> float:
        return self.ms


def _real_core(step_ms: float) -> EngineCore:
    config = EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=256)
    return EngineCore(config, SimExecutor(None, config, timing=_FixedTiming(step_ms)))


def test_real_clock_hides_host_work_between_steps_of_running_requests() -> None:
    """Async scheduling: host time between two steps of the same batch overlaps device time."""
    core = _real_core(60.0)
    add(core, 20, 4)
    core.step()  # prefill
    started = time.monotonic()
    for _ in range(3):
        time.sleep(0.02)  # host work between steps, a third of a step
        core.step()
    # Three 60 ms steps, each launched 20 ms after the last ended: they run back to back (180 ms),
    # not 3 x (20 + 60) = 240 ms.
    assert time.monotonic() - started < 0.225


def test_real_clock_never_starts_a_step_before_its_request_arrived() -> None:
    """A request that arrives just after the device went idle starts its own step on arrival: its
    first token comes a full step after it arrived, not earlier (no step ran in the past)."""
    core = _real_core(60.0)
    add(core, 20, 1)
    core.step()  # the only request finishes; the device is idle from here
    time.sleep(0.02)
    arrived = time.monotonic()
    add(core, 20, 1, first=500)
    core.step()
    assert time.monotonic() - arrived >= 0.06


def test_real_clock_loses_a_host_stall_less_the_queued_step() -> None:
    """A host stall longer than a step (a late wake-up, a paused process): the step queued before it
    ran meanwhile, so its output is ready when the host returns and the stall costs one step less."""
    core = _real_core(60.0)
    add(core, 20, 6)
    core.step()  # prefill
    core.step()  # decode
    stalled = time.monotonic()
    time.sleep(0.15)  # the host is away for two and a half steps
    core.step()  # queued before the stall: done by the time the host returns
    core.step()  # launched on return
    elapsed = time.monotonic() - stalled
    # 150 ms + one step = 210 ms; losing the whole stall would take 150 + 2 x 60 = 270 ms.
    assert 0.2 <= elapsed < 0.255


def test_real_clock_starts_a_new_batch_after_an_idle_gap_now() -> None:
    """No catch-up after the device went idle: a request that comes in after a gap longer than a
    step gets its step launched when the host takes it, not back-dated."""
    core = _real_core(60.0)
    add(core, 20, 1)
    core.step()
    time.sleep(0.1)
    add(core, 20, 1, first=500)
    taken = time.monotonic()
    core.step()
    assert time.monotonic() - taken >= 0.06

import random

import pytest

from tandem.router.policy import KvPolicyConfig, WorkerLoad, kv_costs, pick_kv, pick_least_loaded

CFG = KvPolicyConfig()


@pytest.mark.parametrize(
    ("overlaps", "loads", "expected"),
    [
        # Same load: the worker with the prefix wins.
        ({"a": 8}, [WorkerLoad("a", 10), WorkerLoad("b", 10)], "a"),
        # The holder is so loaded that recomputing elsewhere is cheaper (8 blocks < 50 - 10 load).
        ({"a": 8}, [WorkerLoad("a", 50), WorkerLoad("b", 10)], "b"),
        # No overlap anywhere: least decode load.
        ({}, [WorkerLoad("a", 5), WorkerLoad("b", 3)], "b"),
        # Queued prefill tokens count as load (64 tokens = 4 blocks of 16).
        ({}, [WorkerLoad("a", 0, queued_prefill_tokens=64), WorkerLoad("b", 3)], "b"),
        # Equal cost: fewer active blocks, then id.
        ({"a": 2}, [WorkerLoad("a", 4), WorkerLoad("b", 2)], "b"),
    ],
)
def test_argmin_table(overlaps, loads, expected):
    assert pick_kv(10, overlaps, loads, 16, CFG) == expected


def test_cost_formula():
    costs = kv_costs(
        10, {"a": 4}, [WorkerLoad("a", 7, queued_prefill_tokens=32)], 16, KvPolicyConfig(overlap_weight=2.0)
    )
    assert costs == {"a": 2.0 * 6 + 7 + 2}


def test_long_prompts_follow_the_prefill_queue_not_decode_load():
    # a: more decode KV, nothing queued; b: no decode KV, 60 blocks of prefill queued.
    loads = [WorkerLoad("a", 100), WorkerLoad("b", 0, queued_prefill_tokens=60 * 16)]
    cfg = KvPolicyConfig(long_prompt_tokens=512)
    assert pick_kv(4, {}, loads, 16, cfg) == "b", "a short prompt still spreads decode KV"
    assert pick_kv(100, {}, loads, 16, CFG) == "b"
    assert pick_kv(100, {}, loads, 16, cfg) == "a", "1,600 tokens: decode term x 512/1600"
    assert cfg.decode_weight_for(1600) == pytest.approx(0.32) and cfg.decode_weight_for(500) == 1.0
    assert kv_costs(100, {}, loads, 16, cfg) == {"a": pytest.approx(132.0), "b": 160.0}
    with pytest.raises(ValueError, match="long_prompt_tokens"):
        KvPolicyConfig(long_prompt_tokens=-1)


def test_busy_threshold_sheds_load():
    cfg = KvPolicyConfig(busy_threshold=0.9)
    loads = [WorkerLoad("a", 95, capacity_blocks=100), WorkerLoad("b", 50, capacity_blocks=100)]
    assert pick_kv(4, {"a": 4}, loads, 16, cfg) == "b"
    assert pick_kv(4, {}, loads[:1], 16, cfg) is None


def test_busy_prefill_tokens_sheds_load_and_an_idle_worker_is_never_busy():
    cfg = KvPolicyConfig(busy_prefill_tokens=4096)
    loads = [
        WorkerLoad("a", 10, queued_prefill_tokens=5000, capacity_blocks=100),
        WorkerLoad("b", 60, queued_prefill_tokens=4095, capacity_blocks=100),
    ]
    assert pick_kv(4, {"a": 4}, loads, 16, cfg) == "b", "a holds the prefix but its queue is full"
    assert pick_kv(4, {}, loads[:1], 16, cfg) is None
    both = KvPolicyConfig(busy_threshold=0.5, busy_prefill_tokens=4096)
    assert pick_kv(4, {}, loads, 16, both) is None, "a: queue full; b: 60% of its KV"
    idle = [WorkerLoad("c", 0, queued_prefill_tokens=0, capacity_blocks=100)]
    assert pick_kv(10_000, {}, idle, 16, both) == "c", "a request past every limit still runs alone"


def test_temperature_spreads_choices():
    loads = [WorkerLoad("a", 10), WorkerLoad("b", 12)]
    rng = random.Random(0)
    picks = {pick_kv(4, {}, loads, 16, KvPolicyConfig(temperature=1.0), rng) for _ in range(200)}
    assert picks == {"a", "b"}
    assert {pick_kv(4, {}, loads, 16, CFG) for _ in range(20)} == {"a"}


def test_least_loaded():
    assert pick_least_loaded([WorkerLoad("a", active_requests=3), WorkerLoad("b", active_requests=1)]) == "b"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"overlap_weight": -1}, "must be >= 0"),
        ({"long_prompt_tokens": -1}, "long_prompt_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"busy_threshold": 0}, "busy_threshold"),
        ({"busy_prefill_tokens": 0}, "busy_prefill_tokens"),
    ],
)
def test_bad_policy_settings_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        KvPolicyConfig(**fields)


def test_queued_prefill_that_shares_the_next_step_is_free():
    # a just finished its batch: no decode KV, 12 short prompts (12 x 128 tokens) queued for its next
    # step. b is decoding 30 requests (60 blocks). A 128-token prompt: counted as a queue, a's 96
    # queued blocks outweigh b's decode load and the prompt would stall b's decodes; with a's step
    # budget (8,192 tokens) they all prefill in one step, so a takes it.
    cfg = KvPolicyConfig(overlap_weight=10.0, decode_weight=0.3, queued_weight=1.0)
    a = WorkerLoad("a", 24, queued_prefill_tokens=12 * 128, step_tokens=8192)
    b = WorkerLoad("b", 60, step_tokens=8192)
    assert pick_kv(8, {}, [a, b], 16, cfg) == "a"
    no_budget = [WorkerLoad("a", 24, queued_prefill_tokens=12 * 128), WorkerLoad("b", 60)]
    assert pick_kv(8, {}, no_budget, 16, cfg) == "b", "an unknown step budget counts every token"
    # Only what fits beside the request's own tokens is free: 8,128 queued + 128 own > 8,192 by 64.
    full = [WorkerLoad("a", 0, queued_prefill_tokens=8128, step_tokens=8192)]
    assert kv_costs(8, {}, full, 16, cfg) == {"a": pytest.approx(10.0 * 8 + 64 / 16)}
    # A prompt that fills a step alone leaves no room: its queue counts whole.
    long = [WorkerLoad("a", 0, queued_prefill_tokens=640, step_tokens=8192)]
    assert kv_costs(600, {}, long, 16, cfg) == {"a": pytest.approx(10.0 * 600 + 40)}

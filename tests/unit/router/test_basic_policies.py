"""Basic routing policies: table tests of pure choices."""

from __future__ import annotations

import pytest

from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.router.basic import LeastLoaded, Random, RoundRobin, make_policy
from tandem.router.policy import WorkerLoad

REQ = GenerateRequest("r", "m", [1], SamplingSpec())


def _w(wid: str, active: int = 0, blocks: int = 0) -> WorkerLoad:
    return WorkerLoad(wid, active_blocks=blocks, active_requests=active)


def test_round_robin_cycles_in_id_order_whatever_the_input_order() -> None:
    rr = RoundRobin()
    picks = [rr.pick(REQ, [_w("c"), _w("a"), _w("b")]) for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_survives_a_shrinking_set() -> None:
    rr = RoundRobin()
    assert rr.pick(REQ, [_w("a"), _w("b"), _w("c")]) == "a"
    assert rr.pick(REQ, [_w("a"), _w("c")]) == "c"
    assert rr.pick(REQ, [_w("a")]) == "a"


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ([_w("a", 3), _w("b", 1), _w("c", 2)], "b"),
        ([_w("a", 1, blocks=50), _w("b", 1, blocks=10)], "b"),  # tie on requests: fewer KV blocks
        ([_w("b", 0), _w("a", 0)], "a"),  # full tie: lowest id
        ([_w("a", 5)], "a"),
    ],
)
def test_least_loaded(workers: list[WorkerLoad], expected: str) -> None:
    assert LeastLoaded().pick(REQ, workers) == expected


def test_random_is_seeded_and_covers_every_worker() -> None:
    workers = [_w("a"), _w("b"), _w("c")]
    first = [Random(seed=1).pick(REQ, workers) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same first choice
    picks = Random(seed=0)
    assert {picks.pick(REQ, workers) for _ in range(100)} == {"a", "b", "c"}


@pytest.mark.parametrize("name", ["round-robin", "random", "least-loaded"])
def test_make_policy_by_name(name: str) -> None:
    assert make_policy(name).name == name


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match="unknown router policy"):
        make_policy("fastest")


def test_kv_policy_replace_the_tuned_defaults() -> None:
    from tandem.router.kv_policy import TUNED, KvPolicy

    policy = make_policy("kv", {"overlap_weight": 3.0})
    assert isinstance(policy, KvPolicy)
    cfg = policy.router.config.policy
    assert cfg.overlap_weight == 3.0 and cfg.decode_weight == TUNED.decode_weight
    with pytest.raises(ValueError, match="apply to"):
        make_policy("least-loaded", {"overlap_weight": 3.0})
    with pytest.raises(ValueError, match="unknown router settings"):
        make_policy("kv", {"prefix_weight": 3.0})

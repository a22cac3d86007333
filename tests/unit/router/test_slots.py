import random

import numpy as np

from tandem.protocol.kv_events import BlockStored
from tandem.router.indexer import KvIndexer
from tandem.router.kv import KvRouter, KvRouterConfig
from tandem.router.policy import KvPolicyConfig, WorkerLoad, pick_kv
from tandem.router.slots import WorkerSlots, mask_slots


def test_slots_are_dense_and_reused_lowest_first():
    s = WorkerSlots()
    assert [s.slot(w) for w in "abcd"] == [0, 1, 2, 3]
    assert s.slot("b") == 1, "a known worker keeps its slot"
    s.release("c")
    s.release("a")
    assert s.slot("e") == 0 and s.slot("f") == 2 and s.slot("g") == 4
    assert s.worker(2) == "f" and "c" not in s and len(s) == 5


def test_mask_slots_few_and_many_bits():
    assert mask_slots(0) == [] and mask_slots(0b1010) == [1, 3]
    bits = sorted(random.Random(0).sample(range(3000), 700))
    mask = sum(1 << b for b in bits)
    assert list(mask_slots(mask)) == bits


def test_matches_against_a_large_fleet():
    """1,000 workers: one shared first block, each holding a prefix of its own length."""
    idx = KvIndexer()
    chain = list(range(100, 164))
    for w in range(1000):
        idx.apply_events(f"w{w}", [BlockStored(0, chain[: 1 + w % 64], None, 4)])
    got = idx.find_matches(chain)
    assert got == {f"w{w}": 1 + w % 64 for w in range(1000)}
    out = np.zeros(1000, np.int64)
    idx.overlaps(chain, out)
    assert out.tolist() == [1 + w % 64 for w in range(1000)]


def test_a_removed_workers_slot_is_clean_for_the_next_worker():
    r = KvRouter(KvRouterConfig(block_size=4))
    r.apply_events("old", [BlockStored(0, [1, 2, 3], None, 4)])
    r.route("a", [1, 2, 3], 12, [WorkerLoad("old")])
    r.remove_worker("old")
    r.apply_events("new", [BlockStored(0, [9], None, 4)])
    assert r.slots.get("new") == 0, "the slot was reused"
    assert r.indexer.find_matches([1, 2, 3]) == {}
    assert r.loads(["new"]) == [WorkerLoad("new")]
    # The new worker starts idle: a request with no overlap anywhere goes to it, not to a busy one.
    r.route("b", [5] * 8, 32, [WorkerLoad("busy")])
    d = r.route("c", [7], 4, [WorkerLoad("busy"), WorkerLoad("new")])
    assert d is not None and d.worker_id == "new"


def _reference_pick(n, overlaps, loads, bs, cfg, rng):
    """The per-worker loop the array version replaced: cost, then load, then a seeded choice."""
    dw = cfg.decode_weight_for(n * bs)
    keyed = []
    for w in loads:
        left = n - min(overlaps.get(w.worker_id, 0), n)
        queued = w.queued_prefill_tokens / bs
        cost = cfg.overlap_weight * left + dw * w.active_blocks + cfg.queued_weight * queued
        keyed.append(((cost, w.active_blocks + queued), w.worker_id))
    best = min(k for k, _ in keyed)
    tied = [w for k, w in keyed if k == best]
    return tied[0] if len(tied) == 1 else rng.choice(sorted(tied))


def test_array_policy_equals_the_per_worker_loop():
    gen = random.Random(1)
    cfg = KvPolicyConfig(overlap_weight=10.0, decode_weight=0.3, long_prompt_tokens=64)
    for _ in range(500):
        loads = [WorkerLoad(f"w{i}", gen.choice([0, 4, 8, 16]), gen.choice([0, 16, 64])) for i in range(12)]
        overlaps = {w.worker_id: gen.randrange(0, 6) for w in loads if gen.random() < 0.5}
        n = gen.randrange(1, 40)
        seed = gen.random()
        want = _reference_pick(n, overlaps, loads, 16, cfg, random.Random(seed))
        assert pick_kv(n, overlaps, loads, 16, cfg, random.Random(seed)) == want


def test_alternating_candidate_lists_and_expiry_keep_loads_exact():
    """A disaggregated router alternates prefill and decode candidates, and expiry frees load on
    workers outside the current list: each decision must still see every worker's true load."""
    r = KvRouter(KvRouterConfig(block_size=4, active_ttl=10.0))
    prefill, decode = [WorkerLoad("p0"), WorkerLoad("p1")], [WorkerLoad("d0"), WorkerLoad("d1")]
    big = r.route("big", [], 400, prefill, now=0.0)  # 100 blocks on one prefill worker
    assert big is not None
    r.route("big-d", [], 400, decode, now=0.0, kv_transferred=True)
    small = r.route("small", [], 4, prefill, now=1.0)
    assert small is not None and small.worker_id != big.worker_id, "avoids the 100 blocks"
    r.route("x", [], 4, decode, now=10.5, kv_transferred=True)  # "big" expires here
    assert r.loads([big.worker_id])[0].active_blocks == 0
    # Now big's worker is idle and small's holds 1 block: the next prefill goes to big's worker.
    nxt = r.route("next", [], 4, prefill, now=10.6)
    assert nxt is not None and nxt.worker_id == big.worker_id

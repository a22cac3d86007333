"""KvRouter: overlap-following, load counting, approximate mode, overrides, shedding, metrics."""

import pytest

from tandem.bench.traces import TokenSpace, TraceRequest
from tandem.kvcache.hashing import block_hashes
from tandem.protocol.kv_events import BlockRemoved, BlockStored, KvCacheDump
from tandem.router.kv import KvRouter, KvRouterConfig
from tandem.router.policy import KvPolicyConfig, WorkerLoad
from tandem.sim.replay import ReplaySpec, replay

BS = 16
WORKERS = [WorkerLoad(f"w{i}", capacity_blocks=100) for i in range(4)]


def prompt(seed: int, n_blocks: int) -> list[int]:
    return [(seed * 7919 + i) % 1000 + 1 for i in range(n_blocks * BS)]


def test_follows_the_holder_and_counts_load():
    r = KvRouter(KvRouterConfig(block_size=BS))
    hashes = block_hashes(prompt(1, 8), BS)
    r.apply_events("w2", [BlockStored(0, hashes[:6], None, BS)])
    d = r.route("a", hashes, 8 * BS, WORKERS)
    assert d is not None and (d.worker_id, d.overlap_blocks, d.prefill_tokens) == ("w2", 6, 2 * BS)
    assert r.active.active_blocks("w2") == 8 and r.active.queued_prefill_tokens("w2") == 2 * BS
    r.prefill_done("a")
    r.finish("a")
    assert r.active.active_blocks("w2") == 0
    assert r.metrics.decisions["w2"] == 1 and r.metrics.predicted_cached_tokens == 6 * BS
    assert r.metrics.snapshot()["decision_p99_ms"] >= 0


def test_unrelated_requests_spread_by_load():
    r = KvRouter(KvRouterConfig(block_size=BS))
    chosen = [r.route(f"r{i}", block_hashes(prompt(i, 4), BS), 4 * BS, WORKERS) for i in range(4)]
    assert {d.worker_id for d in chosen if d} == {"w0", "w1", "w2", "w3"}


def test_a_loaded_holder_loses_to_an_idle_worker_when_overlap_weighs_little():
    cfg = KvRouterConfig(block_size=BS, policy=KvPolicyConfig(overlap_weight=1.0, decode_weight=1.0))
    r = KvRouter(cfg)
    hashes = block_hashes(prompt(1, 4), BS)
    r.apply_events("w0", [BlockStored(0, hashes, None, BS)])
    r.active.add("busy", "w0", blocks=50, prefill_tokens=0)
    d = r.route("a", hashes, 4 * BS, WORKERS)
    assert d is not None and d.worker_id != "w0"
    # A per-request override makes the same request follow its cache.
    d = r.route("b", hashes, 4 * BS, WORKERS, overrides={"overlap_weight": 100.0})
    assert d is not None and d.worker_id == "w0"


def test_gap_resync_and_purge():
    r = KvRouter(KvRouterConfig(block_size=BS))
    h = block_hashes(prompt(3, 4), BS)
    assert r.apply_events("w1", [BlockStored(0, h[:2], None, BS)])
    assert not r.apply_events("w1", [BlockStored(5, h[2:], h[1], BS)])  # ids 1..4 lost
    r.apply_dump("w1", KvCacheDump(last_event_id=5, block_size=BS, blocks=[(x, None) for x in h]))
    assert r.indexer.find_matches(h) == {"w1": 4} and r.metrics.resyncs == 1
    assert r.apply_events("w1", [BlockRemoved(6, h[3:])])
    assert r.indexer.find_matches(h) == {"w1": 3}
    r.remove_worker("w1")
    assert r.indexer.find_matches(h) == {}


def test_decode_leg_is_placed_by_load_without_prefill():
    r = KvRouter(KvRouterConfig(block_size=BS))
    h = block_hashes(prompt(4, 4), BS)
    r.apply_events("w0", [BlockStored(0, h, None, BS)])
    r.active.add("x", "w0", blocks=5, prefill_tokens=0)
    d = r.route("a", h, 4 * BS, WORKERS, kv_transferred=True)
    assert d is not None and d.worker_id != "w0" and d.prefill_tokens == 0
    assert r.active.decode_blocks(d.worker_id) == 0 and r.active.queued_prefill_tokens(d.worker_id) == 0


def test_approximate_mode_predicts_then_forgets():
    r = KvRouter(KvRouterConfig(block_size=BS, approx_ttl=10.0))
    h = block_hashes(prompt(5, 6), BS)
    first = r.route("a", h, 6 * BS, WORKERS, now=0.0)
    r.finish("a")
    assert first is not None
    assert r.apply_events(first.worker_id, [BlockStored(0, [123], None, BS)])  # ignored
    again = r.route("b", h, 6 * BS, WORKERS, now=5.0)
    assert again is not None and again.worker_id == first.worker_id and again.overlap_blocks == 6
    r.finish("b")
    # The second route renewed the prediction to t=15: still there at 12, gone at 16.
    assert r.route("c", h, 6 * BS, WORKERS, now=12.0).overlap_blocks == 6  # type: ignore[union-attr]
    r.finish("c")
    assert r.indexer.find_matches(h) != {}
    r.route("d", [1, 2], 2 * BS, WORKERS, now=30.0)
    assert first.worker_id not in r.indexer.find_matches(h)


def test_approximate_mode_predicts_a_cache_of_the_workers_capacity():
    """Each worker's predicted cache is an LRU of its capacity; a prompt's first blocks go last."""
    r = KvRouter(KvRouterConfig(block_size=BS, approx_ttl=600.0))
    one = [WorkerLoad("w0", capacity_blocks=4)]
    a, b = block_hashes(prompt(1, 3), BS), block_hashes(prompt(2, 3), BS)
    assert r.route("a", a, 3 * BS, one, now=0.0) is not None
    r.finish("a")
    assert r.route("b", b, 3 * BS, one, now=1.0) is not None  # 6 predicted blocks > 4: evict 2
    r.finish("b")
    assert r.indexer.find_matches(a) == {"w0": 1}, "a's tail went first; its first block is left"
    assert r.indexer.find_matches(b) == {"w0": 3}
    unknown = [WorkerLoad("w1")]  # capacity not reported: the TTL alone bounds the prediction
    for i in range(10):
        r.route(f"u{i}", block_hashes(prompt(10 + i, 3), BS), 3 * BS, unknown, now=2.0)
    assert r.indexer.find_matches(block_hashes(prompt(10, 3), BS)) == {"w1": 3}


def test_busy_threshold_sheds():
    r = KvRouter(KvRouterConfig(block_size=BS, policy=KvPolicyConfig(busy_threshold=0.5)))
    small = [WorkerLoad("w0", capacity_blocks=10)]
    assert r.route("a", [1] * 6, 6 * BS, small) is not None
    assert r.route("b", [1], BS, small) is None and r.metrics.shed == 1


def conversations(n_conv: int = 25, turns: int = 5) -> list[TraceRequest]:
    """Multi-turn chats: turn k's prompt is turn k-1's blocks plus 4 new ones, 2 s apart (25 chats,
    so round-robin does not land each chat on one worker by accident)."""
    space = TokenSpace(block_size=BS)
    out = []
    for c in range(n_conv):
        ids: list[int] = [0]  # a system prompt every chat shares
        for k in range(turns):
            ids = ids + [1 + c * 100 + k * 4 + j for j in range(4)]
            arrival = k * 2.0 + c * 0.05
            out.append(TraceRequest(arrival, len(ids) * BS, 8, tuple(ids), len(out), space))
    return out


@pytest.mark.parametrize("router", ["kv", "kv-approx"])
def test_kv_replay_follows_conversations(router):
    spec = ReplaySpec(block_size=BS, num_blocks=2048)
    reqs = conversations()
    base = replay(spec, 4, "round-robin", reqs).summary()
    kv = replay(spec, 4, router, reqs).summary()
    assert kv["completed"] == base["completed"] == len(reqs)
    # Every later turn can hit its whole previous prompt: (k-1)*4+1 of k*4+1 blocks.
    assert kv["hit_rate"] > 0.5 > base["hit_rate"], (kv["hit_rate"], base["hit_rate"])

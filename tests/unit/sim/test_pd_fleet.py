"""P/D fleet simulator: exact hand-off timing, every token once, KV freed on both sides, goodput search."""

from __future__ import annotations

import pytest

from tandem.bench.traces import TokenSpace, TraceRequest
from tandem.engine.config import EngineConfig
from tandem.engines.sim.profiles import llama3_70b_h100_fp8
from tandem.router.disagg import DisaggPolicy
from tandem.sim.goodput import PoissonWorkload, Slo, attainment, find_goodput, tpot_s
from tandem.sim.metrics import RequestRecord, RunMetrics
from tandem.sim.pd_fleet import PDFleet, PDFleetConfig

TIMING = llama3_70b_h100_fp8()
KVB = TIMING.kv_bytes_per_token
SPACE = TokenSpace(block_size=16)


def config(
    p: int, d: int, *, budget: int = 512, blocks: int = 2048, threshold: int = 0, **kw
) -> PDFleetConfig:
    def engine(b: int, n: int) -> EngineConfig:
        return EngineConfig(block_size=16, num_blocks=n, max_num_batched_tokens=b, max_model_len=32768)

    return PDFleetConfig(
        p,
        d,
        engine(8192, 2048),
        engine(budget, blocks),
        TIMING,
        KVB,
        policy=DisaggPolicy(min_remote_prompt_tokens=threshold),
        **kw,
    )


def reqs(rows: list[tuple[float, int, int]]) -> list[TraceRequest]:
    return [TraceRequest(t, i, o, index=k, space=SPACE) for k, (t, i, o) in enumerate(rows)]


def assert_clean(fleet: PDFleet) -> None:
    for w in fleet.workers:
        s = w.core.scheduler
        assert w.core.kv.num_used_blocks == 0, f"worker {w.index} still holds blocks"
        assert not (s.held or s.waiting_for_kv or s.waiting or s.running or s.requests)
        assert w.prefill_tokens == 0 and w.kv_tokens == 0


def test_lone_request_ttft_includes_transfer() -> None:
    fleet = PDFleet(config(1, 1, link_bytes_per_s=12.5e9))
    m = fleet.run(reqs([(0.0, 1000, 4)]))
    rec = m.records[0]
    prefill = TIMING.prefill_ms(1000) / 1e3
    transfer = 0.001 + 1000 * KVB / 12.5e9
    assert rec.first_token == pytest.approx(prefill + transfer)
    assert fleet.stats.transfer_s == [pytest.approx(transfer)]
    # Then three decode steps of one request whose context grows from 1001 tokens.
    decodes = sum(TIMING.decode_ms(1, 1001 + k) for k in range(3)) / 1e3
    assert rec.last_token == pytest.approx(prefill + transfer + decodes)
    assert rec.finished and rec.num_tokens == 4 and rec.engine == 0
    assert_clean(fleet)


@pytest.mark.parametrize("p,d,threshold", [(0, 3, 0), (2, 2, 0), (1, 3, 600), (3, 1, 0)])
def test_every_token_once_and_kv_freed(p: int, d: int, threshold: int) -> None:
    rows = [(0.05 * k, 100 + (k * 397) % 1500, 1 + (k * 31) % 40) for k in range(60)]
    fleet = PDFleet(config(p, d, threshold=threshold))
    m = fleet.run(reqs(rows))
    assert [r.num_tokens for r in m.records] == [o for _, _, o in rows]
    assert all(r.finished and r.first_token >= r.arrival for r in m.records)
    assert len(m.itl_gaps) == sum(o - 1 for _, _, o in rows)
    remote = sum(1 for _, i, o in rows if p and i >= threshold and o > 1)
    assert (fleet.stats.num_remote, fleet.stats.num_local) == (remote, len(rows) - remote)
    assert_clean(fleet)


def test_decode_preemption_recomputes_without_duplicates() -> None:
    # 40 blocks of 16 tokens: two 300-token requests fit, a third forces preemption of a running one.
    rows = [(0.0, 300, 30)] * 6
    fleet = PDFleet(config(2, 1, blocks=40))
    m = fleet.run(reqs(rows))
    assert fleet.decode[0].core.stats().num_preemptions > 0
    assert [r.num_tokens for r in m.records] == [30] * 6
    assert_clean(fleet)


def test_aggregated_mode_never_transfers() -> None:
    fleet = PDFleet(config(0, 2))
    m = fleet.run(reqs([(0.0, 500, 5), (0.0, 700, 5)]))
    assert fleet.stats.num_remote == 0 and not fleet.stats.transfer_s
    assert {r.engine for r in m.records} == {0, 1}  # an idle pool spreads work


def test_find_goodput_brackets_and_bisects() -> None:
    def run(rate: float) -> RunMetrics:
        ttft = 1.0 if rate <= 7.3 else 3.0
        return RunMetrics(records=[RequestRecord(0.0, 10, 0, ttft, ttft + 0.4, 11, 0, True)])

    r = find_goodput(run, Slo(), 2.0, rel_tol=0.01)
    assert 7.3 / 1.01 <= r.rate <= 7.3
    assert r.metrics is not None and tpot_s(r.metrics.records[0]) == pytest.approx(0.04)
    assert find_goodput(lambda rate: run(100.0), Slo(), 1.0).rate == 0.0


def test_tiny_goodput_search_on_a_fleet() -> None:
    wl = PoissonWorkload([(800, 20), (2000, 40), (300, 60)], 60, seed=3, space=SPACE)
    res = find_goodput(lambda rate: PDFleet(config(1, 1)).run(wl(rate)), Slo(), 2.0, rel_tol=0.1)
    assert res.rate > 0 and res.metrics is not None
    assert attainment(res.metrics, Slo()) >= 0.9
    bad = [a for rate, a in res.probes if rate > res.rate]
    assert bad and all(a < 0.9 for a in bad)
    # Same seed, another rate: the same requests, arrivals scaled.
    a, b = wl(1.0), wl(2.0)
    assert [r.input_len for r in a] == [r.input_len for r in b]
    assert b[10].arrival_s == pytest.approx(a[10].arrival_s / 2)

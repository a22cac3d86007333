"""Trace loading: deterministic expansion of Mooncake hash ids, scaling, Azure CSV."""

from __future__ import annotations

import json

import pytest

from tandem.bench.traces import TokenSpace, TraceRequest, load_azure, load_mooncake


@pytest.fixture
def mooncake(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [7, 8, 9]},
        {"timestamp": 2000, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 11]},
        {"timestamp": 4000, "input_length": 300, "output_length": 1, "hash_ids": [12]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_same_hash_id_same_tokens(mooncake) -> None:
    a, b, _ = load_mooncake(mooncake)
    ta, tb = a.prompt_token_ids(), b.prompt_token_ids()
    assert len(ta) == 1200 and len(tb) == 1100
    assert ta[:1024] == tb[:1024]  # ids 7 and 8 shared
    assert ta[1024:1100] != tb[1024:1100]  # 9 vs 11
    assert a.prompt_token_ids() == ta  # the same on every call
    assert all(100 <= t < 32000 for t in ta)
    assert len(set(ta[:512])) > 400  # looks random, not constant


def test_tokens_depend_on_seed_and_vocab(mooncake) -> None:
    (a, *_), (b, *_) = load_mooncake(mooncake), load_mooncake(mooncake, seed=1)
    assert a.prompt_token_ids() != b.prompt_token_ids()
    (c, *_) = load_mooncake(mooncake, vocab=(5, 9))
    assert set(c.prompt_token_ids()) <= set(range(5, 9))


def test_time_and_length_scaling(mooncake) -> None:
    reqs = load_mooncake(mooncake, speedup=2.0, length_divisor=4)
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 2.0]
    assert [r.input_len for r in reqs] == [300, 275, 75]
    assert [r.output_len for r in reqs] == [3, 2, 1]  # rounded up, at least 1
    a, b = reqs[0].prompt_token_ids(), reqs[1].prompt_token_ids()
    assert a[:256] == b[:256] and a[256:275] != b[256:275]  # 128-token blocks now
    with pytest.raises(ValueError):
        load_mooncake(mooncake, length_divisor=3)


def test_limit_and_missing_hash_ids() -> None:
    r = TraceRequest(0.0, 1000, 1, (5,), index=3, space=TokenSpace(block_size=512))
    s = TraceRequest(0.0, 1000, 1, (5,), index=4, space=TokenSpace(block_size=512))
    assert r.prompt_token_ids()[:512] == s.prompt_token_ids()[:512]
    assert r.prompt_token_ids()[512:] != s.prompt_token_ids()[512:]  # unnamed blocks are per request


def test_azure(tmp_path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    a, b = load_azure(path)
    assert a.arrival_s == 0.0 and b.arrival_s == pytest.approx(4.314579)
    assert (a.input_len, a.output_len) == (374, 44)
    assert len(b.prompt_token_ids()) == 396
    assert a.prompt_token_ids()[:300] != b.prompt_token_ids()[:300]
    assert len(load_azure(path, limit=1)) == 1


def test_real_traces_load_when_present() -> None:
    from tandem.bench.traces import default_trace_dir

    if not (default_trace_dir() / "mooncake_conversation_trace.jsonl").is_file():
        pytest.skip("shared traces not present")
    reqs = load_mooncake(limit=50)
    assert len(reqs) == 50 and reqs[0].hash_ids[0] == 0
    assert len(load_azure(limit=20)) == 20

"""Disaggregation at the engine seam, in one process: a prefill EngineCore computes the prompt and
first token, its KV moves to a decode EngineCore through the DisaggConnector (shared memory or
TCP), and greedy output is token-identical to one aggregated engine. No block leaks on either side.
"""

from __future__ import annotations

import random
import time

import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import SamplingParams
from tandem.engines.builtin.executor import BuiltinExecutor
from tandem.models.tiny import write_tiny_model
from tandem.protocol.errors import TransferFailedError
from tandem.transfer.connector import DisaggConnector
from tandem.transfer.layout import KvLayout

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def layout_for(model_dir, block_size=16, dtype="float32") -> KvLayout:
    from tandem.engines.builtin.loader import load_config

    cfg = load_config(model_dir)
    return KvLayout(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, model="tiny")


def engine(model_dir, *, use_shm=True, connector=True, num_blocks=256, block_size=16):
    cfg = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=512)
    conn = DisaggConnector(layout_for(model_dir, block_size), use_shm=use_shm) if connector else None
    ex = BuiltinExecutor(model_dir, cfg, dtype="float32", kv_connector_worker=conn)
    core = EngineCore(cfg, ex, connector=(conn, conn) if conn else None)
    return core, conn


def drain(core: EngineCore, timeout=30.0, *, transfers=True) -> dict[str, list]:
    """Step until done; with transfers=False, stop once only held/loading KV remains."""
    outs: dict[str, list] = {}
    deadline = time.monotonic() + timeout
    while core.has_unfinished() if transfers else core.has_runnable():
        assert time.monotonic() < deadline, "engine did not finish"
        step = core.step()
        if not step:
            time.sleep(0.001)
        for o in step:
            outs.setdefault(o.request_id, []).append(o)
    return outs


def prompts(n=16, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    out = []
    for i in range(n):
        length = [5, 17, 33, 64, 130][i % 5]
        body = [rng.randrange(3, 500) for _ in range(length)]
        out.append(shared + body if i % 3 == 0 else body)  # some share a 40-token prefix
    return out


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "tcp"])
def test_disaggregated_greedy_equals_aggregated(model_dir, use_shm):
    ps = prompts()
    agg, _ = engine(model_dir, connector=False)
    for i, p in enumerate(ps):
        agg.add_request(p, GREEDY, request_id=f"r{i}")
    expected = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in drain(agg).items()}

    prefill, pconn = engine(model_dir, use_shm=use_shm)
    decode, dconn = engine(model_dir, use_shm=use_shm)
    try:
        for i, p in enumerate(ps):
            prefill.add_request(
                p,
                SamplingParams(max_tokens=1, temperature=0.0),
                request_id=f"r{i}",
                kv_transfer_params={"do_remote_decode": True},
            )
        handoffs = {rid: outs[-1] for rid, outs in drain(prefill, transfers=False).items()}
        for i, p in enumerate(ps):
            first = handoffs[f"r{i}"]
            params = first.kv_transfer_params
            assert params is not None and params["num_tokens"] == len(p)
            assert bool(params["shm_path"]) == use_shm
            decode.add_request(
                p, GREEDY, request_id=f"r{i}", kv_transfer_params=params, output_token_ids=first.new_token_ids
            )
        outs = drain(decode)
        drain(prefill)  # the prefill side frees blocks as the decode side reports them read
        got = {
            rid: handoffs[rid].new_token_ids + [t for o in os_ for t in o.new_token_ids]
            for rid, os_ in outs.items()
        }
        assert got == expected
        assert dconn.num_loads == len(ps) and dconn.num_load_failures == 0
        block_bytes = dconn.layout.layer_block_bytes * dconn.layout.num_layers
        assert dconn.load_seconds_total > 0
        assert dconn.load_bytes_total > 0 and dconn.load_bytes_total % block_bytes == 0
        # The decode side's prefix cache also serves prompts sharing the 40-token prefix: fewer blocks read.
        assert prefill.kv.num_used_blocks == 0 and decode.kv.num_used_blocks == 0
        assert pconn.agent.server.num_held == 0
    finally:
        pconn.close()
        dconn.close()


def test_failed_load_falls_back_to_local_prefill(model_dir):
    p = prompts(1, seed=7)[0]
    agg, _ = engine(model_dir, connector=False)
    agg.add_request(p, GREEDY, request_id="x")
    expected = [t for o in drain(agg)["x"] for t in o.new_token_ids]

    decode, dconn = engine(model_dir)
    try:
        bogus = {
            "remote_address": "127.0.0.1:1",
            "remote_handle": "gone",
            "num_tokens": len(p),
            "shm_path": "",
        }
        decode.add_request(p, GREEDY, request_id="x", kv_transfer_params=bogus, output_token_ids=expected[:1])
        got = expected[:1] + [t for o in drain(decode)["x"] for t in o.new_token_ids]
        assert got == expected
        assert dconn.num_load_failures == 1 and decode.kv.num_used_blocks == 0
    finally:
        dconn.close()


def test_different_block_sizes_are_refused_not_corrupted(model_dir):
    p = prompts(1)[0]
    prefill, pconn = engine(model_dir, block_size=16)
    _decode, dconn = engine(model_dir, block_size=8)
    try:
        prefill.add_request(
            p,
            SamplingParams(max_tokens=1, temperature=0.0),
            request_id="x",
            kv_transfer_params={"do_remote_decode": True},
        )
        first = drain(prefill, transfers=False)["x"][-1]
        fut = dconn.agent.submit(
            dconn.agent.reader.read(
                first.kv_transfer_params["remote_address"],
                first.kv_transfer_params["remote_handle"],
                [0, 1, 2, 3],
            )
        )
        with pytest.raises(TransferFailedError, match="block_size: 16 there vs 8 here"):
            fut.result(timeout=10)
    finally:
        pconn.close()
        dconn.close()


def test_aborting_a_loading_request_frees_blocks_after_the_load(model_dir):
    p = prompts(1, seed=5)[0]
    prefill, pconn = engine(model_dir)
    decode, dconn = engine(model_dir)
    try:
        prefill.add_request(
            p,
            SamplingParams(max_tokens=1, temperature=0.0),
            request_id="x",
            kv_transfer_params={"do_remote_decode": True},
        )
        first = drain(prefill, transfers=False)["x"][-1]
        decode.add_request(
            p,
            GREEDY,
            request_id="x",
            kv_transfer_params=first.kv_transfer_params,
            output_token_ids=first.new_token_ids,
        )
        decode.step()  # admitted, load started
        assert decode.abort("x")
        outs = drain(decode)
        assert outs["x"][-1].finish_reason == "abort"
        assert decode.kv.num_used_blocks == 0
        deadline = time.monotonic() + 10
        while prefill.has_unfinished() and time.monotonic() < deadline:
            prefill.step()
            time.sleep(0.005)
        assert prefill.kv.num_used_blocks == 0
    finally:
        pconn.close()
        dconn.close()

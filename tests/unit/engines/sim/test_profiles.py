"""The 70B roofline timing model: its derived constants and step times follow the documented formulas."""

from __future__ import annotations

import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.executor import ScheduledRequest, SchedulerOutput
from tandem.engine.request import Request, SamplingParams
from tandem.engines.sim.clock import VirtualClock
from tandem.engines.sim.executor import SimExecutor
from tandem.engines.sim.profiles import LLAMA3_70B, llama3_70b_h100_fp8
from tandem.engines.sim.timing import StepShape

FP8_EFF = 1979e12 * 0.5  # FLOP/s, linear layers
BF16_EFF = 989e12 * 0.5  # FLOP/s, attention
BW_EFF = 3.35e12 * 0.75  # B/s
W_READ = 68_451_041_280 + 1_050_673_152  # linear weights + LM head, 1 byte each
KV_TOKEN = 163_840
PAIR = 4 * 80 * 64 * 128  # attention FLOPs per (query, key) pair


def test_llama3_70b_shapes() -> None:
    assert LLAMA3_70B.linear_params == 68_451_041_280
    assert LLAMA3_70B.total_params == 70_552_387_584
    assert LLAMA3_70B.kv_bytes_per_token(2) == 327_680
    t = llama3_70b_h100_fp8()
    assert t.kv_bytes_per_token == KV_TOKEN
    free = 80 * 2**30 * 0.92 - 70_552_387_584 - 1.5e9
    assert t.kv_capacity_tokens == int(free // KV_TOKEN) == 42_572
    assert t.num_blocks(16) == 42_572 // 16


def test_decode_is_weights_plus_kv_over_bandwidth() -> None:
    t = llama3_70b_h100_fp8()
    assert t.decode_ms(1, 1000) == pytest.approx((W_READ + 1000 * KV_TOKEN) / BW_EFF * 1e3 + 3.0)
    assert t.decode_ms(1, 1000) == pytest.approx(30.73, abs=0.01)
    assert t.decode_ms(32, 32 * 1400) == pytest.approx((W_READ + 44_800 * KV_TOKEN) / BW_EFF * 1e3 + 3.0)


def test_prefill_is_two_flops_a_parameter_plus_causal_attention() -> None:
    t = llama3_70b_h100_fp8()
    linear = (2 * 68_451_041_280 * 1000 + 2 * 1_050_673_152) / FP8_EFF
    attn = PAIR * (1000 * 1001 // 2) / BF16_EFF
    assert t.prefill_ms(1000) == pytest.approx((linear + attn) * 1e3 + 3.0)
    assert t.prefill_ms(1000) == pytest.approx(144.0, abs=0.1)
    # A later chunk attends to the earlier ones too.
    attn2 = PAIR * (1000 * 1000 + 1000 * 1001 // 2) / BF16_EFF
    assert t.prefill_ms(1000, start=1000) == pytest.approx((linear + attn2) * 1e3 + 3.0)
    # Tiny prompts are bound by the weight read, not by FLOPs.
    assert t.prefill_ms(8) == pytest.approx(W_READ / BW_EFF * 1e3 + 3.0)


def test_mixed_steps_max_vs_sum() -> None:
    shape = StepShape(
        512, 30, 0.0, decode_kv_tokens=30_000, num_prefills=1, prefill_attn_pairs=512 * 513 // 2
    )
    roof, summed = llama3_70b_h100_fp8(), llama3_70b_h100_fp8(combine="sum")
    pre, dec = roof.prefill_ms(512), roof.decode_ms(30, 30_000)
    assert summed.step_ms(shape) == pytest.approx(pre + dec - 3.0)  # one overhead per step
    # Roofline: the decodes add only their FLOPs to the chunk's (the weight read is shared).
    compute = (2 * 68_451_041_280 * 542 + 2 * 1_050_673_152 * 31) / FP8_EFF
    compute += PAIR * (512 * 513 // 2 + 30_000) / BF16_EFF
    assert roof.step_ms(shape) == pytest.approx(compute * 1e3 + 3.0)
    assert roof.step_ms(shape) < pre + dec / 4
    for pure in (
        StepShape(512, 0, 0.0, num_prefills=1, prefill_attn_pairs=512 * 513 // 2),
        StepShape(0, 30, 0.0, decode_kv_tokens=30_000),
    ):
        assert roof.step_ms(pure) == pytest.approx(summed.step_ms(pure))
    assert roof.step_ms(StepShape(0, 0, 0.0)) == 0.0


def test_tensor_parallel_scales_and_pays_all_reduces() -> None:
    one, two = llama3_70b_h100_fp8(), llama3_70b_h100_fp8(tp=2)
    free = 2 * (80 * 2**30 * 0.92 - 1.5e9) - 70_552_387_584
    assert two.kv_capacity_tokens == int(free // KV_TOKEN)
    # Two all-reduces a layer: 8 us each plus 1000 x 8192 BF16 rows, half of them crossing NVLink.
    comm = 2 * 80 * (1000 * 8192 * 2 * 2 * 0.5 / (450e9 * 0.7) + 8e-6) * 1e3
    assert two.prefill_ms(1000) == pytest.approx((one.prefill_ms(1000) - 3.0) / 2 + comm + 3.0)


def test_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        llama3_70b_h100_fp8(mbu=1.5)
    with pytest.raises(ValueError):
        llama3_70b_h100_fp8(weight_bytes_per_param=2.0)  # BF16 70B does not fit one H100


def test_executor_counts_attention_pairs_per_request() -> None:
    timing = llama3_70b_h100_fp8()
    cfg = EngineConfig(block_size=16, num_blocks=1024)
    ex = SimExecutor(None, cfg, timing=timing, clock=VirtualClock())
    sp = SamplingParams(max_tokens=4)
    a = Request("a", list(range(1, 301)), sp, 16)
    b = Request("b", list(range(1, 801)), sp, 16)
    out = SchedulerOutput([ScheduledRequest(a, 300, 0), ScheduledRequest(b, 200, 600)], 500)
    got = ex.execute(out).step_seconds * 1e3
    pairs = 300 * 301 // 2 + (200 * 600 + 200 * 201 // 2)
    linear = (2 * 68_451_041_280 * 500 + 2 * 1_050_673_152 * 2) / FP8_EFF
    assert got == pytest.approx((linear + PAIR * pairs / BF16_EFF) * 1e3 + 3.0)

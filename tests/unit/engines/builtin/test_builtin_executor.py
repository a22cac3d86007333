from pathlib import Path

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import SamplingParams
from tandem.engines.builtin.executor import BuiltinExecutor
from tandem.engines.builtin.kv_cache import bytes_per_block

PROMPTS = [[5, 6, 7], list(range(10, 50)), [300] * 17, list(range(100, 120))]


def _run(core: EngineCore, prompts: list[list[int]], sp: SamplingParams):
    reqs = [core.add_request(p, sp) for p in prompts]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    logprobs: dict[str, list[float]] = {r.request_id: [] for r in reqs}
    while core.has_unfinished():
        for o in core.step():
            tokens[o.request_id].extend(o.new_token_ids)
            logprobs[o.request_id].extend(o.new_logprobs or [])
    return [tokens[r.request_id] for r in reqs], [logprobs[r.request_id] for r in reqs]


def _core(path: Path, dtype: str = "float32", **kw) -> EngineCore:
    cfg = EngineConfig(block_size=8, **{"num_blocks": 64, **kw})
    return EngineCore(cfg, BuiltinExecutor(path, cfg, dtype=dtype))


def test_contract_attributes_and_kv_layout(tiny_llama: Path) -> None:
    ex = BuiltinExecutor(tiny_llama, EngineConfig(block_size=8, num_blocks=10), dtype="float32")
    assert (ex.num_blocks, ex.max_model_len, ex.vocab_size, ex.eos_token_ids) == (10, 256, 512, (2,))
    # [layers, blocks, K/V, block_size, kv_heads, head_dim]; one layer's block is contiguous.
    assert ex.kv_cache.shape == (2, 10, 2, 2, 8, 16)
    assert ex.kv_caches[1].shape == (10, 2, 2, 8, 16) and ex.kv_caches[1][3].is_contiguous()


def test_num_blocks_sized_from_kv_cache_bytes(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CPU_HALF", "native")  # bf16 even on a CPU that only emulates it
    per = 2 * 2 * 16 * 2 * 16 * 2  # layers * (K, V) * block_size * kv_heads * head_dim * bf16 bytes
    cfg = EngineConfig(block_size=16, kv_cache_bytes=per * 37 + 5)
    ex = BuiltinExecutor(tiny_llama, cfg, dtype="bfloat16")
    assert bytes_per_block(ex.model_config, 16, torch.bfloat16) == per
    assert ex.num_blocks == 37
    with pytest.raises(ValueError, match="less than one KV block"):
        BuiltinExecutor(tiny_llama, EngineConfig(block_size=16, kv_cache_bytes=per - 1))


def test_bad_dtype(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        BuiltinExecutor(tiny_llama, EngineConfig(num_blocks=4), dtype="int8")


def test_seeded_sampling_is_reproducible_with_logprobs(tiny_llama: Path) -> None:
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=123, logprobs=True)
    first_tokens, first_lps = _run(_core(tiny_llama), PROMPTS, sp)
    # Same seeds through a differently sliced run (tiny step budget): same tokens.
    again_tokens, again_lps = _run(_core(tiny_llama, max_num_batched_tokens=8), PROMPTS, sp)
    assert again_tokens == first_tokens
    assert all(len(lp) == 10 and all(x <= 0.0 for x in lp) for lp in first_lps)
    for a, b in zip(again_lps, first_lps, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    unseeded = SamplingParams(max_tokens=10, temperature=0.8, seed=124)
    assert _run(_core(tiny_llama), PROMPTS, unseeded)[0] != first_tokens


def test_generators_dropped_when_requests_finish(tiny_llama: Path) -> None:
    core = _core(tiny_llama)
    _run(core, PROMPTS, SamplingParams(max_tokens=3, seed=1))
    ex = core.executor
    assert isinstance(ex, BuiltinExecutor)
    _run(core, [[9, 9]], SamplingParams(max_tokens=2, temperature=0.0))
    assert not ex.sampler._generators and not ex._seeded


def test_bfloat16_runs_and_mostly_agrees_with_float32(tiny_llama: Path) -> None:
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    fp32, _ = _run(_core(tiny_llama), PROMPTS, sp)
    bf16, _ = _run(_core(tiny_llama, dtype="bfloat16"), PROMPTS, sp)
    assert sum(a[0] == b[0] for a, b in zip(fp32, bf16, strict=True)) >= 3


def test_torch_threads_from_argument_then_env(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        BuiltinExecutor(tiny_llama, EngineConfig(num_blocks=4), num_threads=1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("TANDEM_TORCH_THREADS", "2")
        BuiltinExecutor(tiny_llama, EngineConfig(num_blocks=4))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("TANDEM_TORCH_THREADS", "0")
        with pytest.raises(ValueError, match="TANDEM_TORCH_THREADS"):
            BuiltinExecutor(tiny_llama, EngineConfig(num_blocks=4))
    finally:
        torch.set_num_threads(before)


def test_single_row_step_restores_onednn_switch(tiny_llama: Path) -> None:
    # A one-token step turns oneDNN off around its weight matmuls; the global switch must come back.
    core = _core(tiny_llama, "bfloat16")
    assert torch.backends.mkldnn.enabled
    core.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    while core.has_unfinished():
        core.step()
        assert torch.backends.mkldnn.enabled


def test_prepacked_weights_give_the_same_greedy_output(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps run on oneDNN-prepacked weights (one-row bf16 steps excepted). Greedy
    tokens and logprobs match an engine that never packs."""
    sp = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True)
    packed = _core(tiny_llama)
    assert packed.executor.weights_packed and packed.executor.model.lm_head_packed is not None
    monkeypatch.setenv("TANDEM_PACK_WEIGHTS", "0")
    plain = _core(tiny_llama)
    assert not plain.executor.weights_packed and plain.executor.model.layers[0].packed == {}
    (tok_a, lp_a), (tok_b, lp_b) = _run(packed, PROMPTS, sp), _run(plain, PROMPTS, sp)
    assert tok_a == tok_b
    pairs = zip(lp_a, lp_b, strict=True)
    assert max(abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)) < 1e-4

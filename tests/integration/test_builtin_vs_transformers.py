"""The built-in executor against Hugging Face transformers on tiny random checkpoints (fp32, CPU).

Logits must agree to 1e-4, and greedy decoding through `EngineCore` must be token-identical to
`generate(do_sample=False)` however the engine slices the work: one big batch, chunked prefill,
prefix-cache hits, and preemption with recompute.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.executor import ScheduledRequest
from tandem.engine.request import Request, SamplingParams
from tandem.engines.builtin.attention import build_step
from tandem.engines.builtin.executor import BuiltinExecutor

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "llama": (LlamaConfig, {}),
    "llama3-rope": (LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "llama-tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "qwen2-bias": (Qwen2Config, {}),
    "qwen3-qknorm": (Qwen3Config, {"head_dim": 32}),
    "qwen3-tied": (Qwen3Config, {"head_dim": 32, "tie_word_embeddings": True}),
}
MAX_TOKENS = 12


def _make(path: Path, variant: str) -> PreTrainedModel:
    config_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**{**COMMON, **extra})).eval()
    with torch.no_grad():
        # HF starts norms at 1 and biases at 0; perturb them so those code paths are really tested.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    # The checkpoint keeps eos 2 (the engine reads it); the reference must not stop on it, as the
    # engine runs with ignore_eos, and generate() merges the model's own generation config.
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PreTrainedModel]]:
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        out[variant] = (path, _make(path, variant))
    return out


def _prompts(n: int, lengths: list[int], seed: int = 1, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 512) for _ in range(length)] for length in lengths[:n]]


def _hf_greedy(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    gen = GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    return out[0, len(prompt) :].tolist()


def _engine_greedy(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    reqs = [core.add_request(p, sp) for p in prompts]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    while core.has_unfinished():
        for o in core.step():
            tokens[o.request_id].extend(o.new_token_ids)
    return [tokens[r.request_id] for r in reqs]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant: str, models) -> None:
    path, model = models[variant]
    if "tied" in variant:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
    block = 16
    ex = BuiltinExecutor(path, EngineConfig(block_size=block, num_blocks=64), dtype="float32")
    a, b, c = _prompts(3, [150, 41, 1], seed=2)
    ra, rb, rc = (Request(f"r{i}", p, SamplingParams(), block) for i, p in enumerate((a, b, c)))
    # Non-contiguous, shuffled block ids so the block-table indirection is exercised.
    ids = list(range(64))
    random.Random(0).shuffle(ids)
    ta, tb, tc = ids[:10], ids[10:13], ids[13:14]

    def run(items: list[ScheduledRequest]) -> torch.Tensor:
        batch = build_step(items, block, ex.model_config.num_kv_heads, ex.device)
        rows = torch.arange(batch.input_ids.shape[0])
        with torch.inference_mode():
            return ex.model.forward(batch.input_ids, batch.positions, batch.attn, ex.kv_caches, rows)

    # Step 1: a's first 100 tokens and b's 30 (plain prefills) and c's only token (a decode row).
    out1 = run(
        [ScheduledRequest(ra, 100, 0, ta), ScheduledRequest(rb, 30, 0, tb), ScheduledRequest(rc, 1, 0, tc)]
    )
    # Step 2: a's next 50 tokens and b's next token (chunks over cached KV, and a decode).
    out2 = run([ScheduledRequest(ra, 50, 100, ta), ScheduledRequest(rb, 1, 30, tb)])
    with torch.no_grad():
        ref = {k: model(torch.tensor([p])).logits[0] for k, p in (("a", a), ("b", b[:31]), ("c", c))}
    # Decodes come first in the flat batch: step 1 rows are c, a[0:100], b[0:30]; step 2: b[30], a[100:150].
    got = {
        "a": torch.cat([out1[1:101], out2[1:51]]),
        "b": torch.cat([out1[101:131], out2[0:1]]),
        "c": out1[0:1],
    }
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    print(f"{variant}: max abs logit diff vs transformers = {diff:.2e}")
    assert diff < 1e-4


SCENARIOS = {
    "one-batch": dict(num_blocks=128),
    "chunked-16": dict(num_blocks=128, max_num_batched_tokens=16),
    "preemption": dict(num_blocks=12),
}
LENGTHS = [3, 7, 16, 17, 33, 64, 90, 120]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("variant", ["llama", "qwen3-qknorm"])
def test_greedy_matches_generate(variant: str, scenario: str, models) -> None:
    path, model = models[variant]
    cfg = EngineConfig(block_size=16, **SCENARIOS[scenario])
    core = EngineCore(cfg, BuiltinExecutor(path, cfg, dtype="float32"))
    prompts = _prompts(8, LENGTHS)
    got = _engine_greedy(core, prompts)
    assert got == [_hf_greedy(model, p) for p in prompts]
    if scenario == "preemption":
        assert core.stats().num_preemptions > 0


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias"])
def test_greedy_with_prefix_cache_hits(variant: str, models) -> None:
    path, model = models[variant]
    cfg = EngineConfig(block_size=16, num_blocks=128, max_num_batched_tokens=64)
    core = EngineCore(cfg, BuiltinExecutor(path, cfg, dtype="float32"))
    shared = _prompts(1, [70], seed=5)[0]
    first = _prompts(8, [3, 9, 15, 20, 31, 40, 2, 1], seed=6, prefix=shared)
    second = _prompts(8, [5, 11, 1, 27, 13, 40, 8, 2], seed=7, prefix=shared) + first[:2]
    assert _engine_greedy(core, first) == [_hf_greedy(model, p) for p in first]
    cached = core.stats().cached_tokens_total
    assert _engine_greedy(core, second) == [_hf_greedy(model, p) for p in second]
    # Every prompt of the second round starts with 4 cached blocks of the shared 70-token prefix.
    assert core.stats().cached_tokens_total - cached >= 64 * len(second)

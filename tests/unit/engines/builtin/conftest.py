"""Tiny random Llama-family checkpoints for the built-in engine's tests (no tokenizer needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config, Qwen3Config

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)


def make_checkpoint(path: Path, kind: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """Save a tiny random model of `kind` to `path`; returns the fp32 transformers model."""
    torch.manual_seed(seed)
    kw = {**COMMON, **overrides}
    if kind == "llama":
        cfg = LlamaConfig(**kw)
    elif kind == "qwen2":
        cfg = Qwen2Config(**kw)
    elif kind == "qwen3":
        cfg = Qwen3Config(**{"head_dim": 32, **kw})
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        # HF starts norms at 1 and biases at 0; perturb them so those code paths are really tested.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="session")
def checkpoint_factory():
    """`make_checkpoint` as a fixture (test modules cannot import this conftest by name)."""
    return make_checkpoint

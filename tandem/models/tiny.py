"""Tiny random-weight Hugging Face checkpoints for tests and demos.

Contract: `write_tiny_model(out_dir, seed)` writes a folder that `transformers.AutoTokenizer` and
`AutoModelForCausalLM.from_pretrained(out_dir)` load offline, laid out like SmolLM2-Instruct:

    config.json              LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM
    model.safetensors        float32 weights drawn under torch.manual_seed(seed)
    generation_config.json   bos/eos/pad ids
    tokenizer.json           a byte-level BPE really trained on a built-in English corpus
    tokenizer_config.json    special tokens and the SmolLM2 ChatML chat_template

Token ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|> as in SmolLM2, with bos = <|im_start|>,
eos = pad = <|im_end|>. The config's vocab_size is the trained tokenizer's size (specials included),
which equals `vocab_size` unless the corpus is too small to learn that many merges.
The same arguments always give byte-identical files (in one environment: config.json records the
transformers version). Takes about a second after imports.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "qwen3")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 1, 2, 2

# SmolLM2-135M-Instruct's template, verbatim (it is also what its GGUF carries).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# Hand-written so the corpus (and so the tokenizer) does not change with the Python version, as
# stdlib docstrings would. Sentences are then recombined to give BPE enough varied text.
_SEED_TEXT = """\
The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome.
What is the capital of Spain? Madrid is the capital of Spain.
A language model predicts the next token from the tokens before it. The server streams each token
back to the client as soon as it is ready. Requests wait in a queue until the scheduler admits them.
The prefill worker reads the whole prompt at once; the decode worker then writes one token a step.
Keys and values are kept in blocks of sixteen tokens, and a block is shared when two prompts agree.
Hello! How are you today? I am fine, thank you. Can you help me write a short poem about the sea?
Sure, here is a poem: the waves come in, the waves go out, and the gulls cry over the sand.
Water boils at 100 degrees Celsius. There are 7 days in a week, 12 months in a year, 365 days.
def add(a, b):
    return a + b
print("hello, world")
for i in range(10): total = total + i * 2
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Please answer the question in one sentence. Explain why the sky is blue. Summarize this text.
Light from the sun is scattered by the air, and blue light is scattered more than red light.
The user asked a question, and the assistant gave a helpful, honest and harmless answer.
"""


def _corpus(num_lines: int = 400) -> list[str]:
    sentences = [s.strip() for s in _SEED_TEXT.replace("\n", " ").split(". ") if s.strip()]
    # A fixed generator, not the model seed: the tokenizer stays the same across seeds, so only the
    # weights differ between tiny models.
    rng = random.Random(0)
    lines = _SEED_TEXT.splitlines()
    for _ in range(num_lines):
        lines.append(". ".join(rng.sample(sentences, 3)) + ".")
    return lines


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, as SmolLM2's) trained on the built-in corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so any text encodes, even bytes the corpus lacks.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": IM_END,
        "unk_token": ENDOFTEXT,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }


def _model_config(arch: str, vocab_size: int, **dims: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"],
        num_key_value_heads=dims["num_kv_heads"],
        max_position_embeddings=dims["max_position_embeddings"],
        tie_word_embeddings=dims["tie_word_embeddings"],
        # Written out for every arch: Qwen3 would otherwise default to 128 whatever hidden_size is,
        # and Qwen2's config would not say it at all.
        head_dim=dims["hidden_size"] // dims["num_heads"],
        rms_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return Qwen3Config(**common)


def write_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random checkpoint plus a trained tokenizer to `out_dir`; return the folder."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials)")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(vocab_size)
    trained_vocab = tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must lead the vocab"
    if trained_vocab < vocab_size:
        log.warning("corpus gave %d tokens, fewer than the %d asked for", trained_vocab, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(max_position_embeddings), indent=2, ensure_ascii=False) + "\n"
    )

    config = _model_config(
        arch,
        trained_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    model.save_pretrained(out, safe_serialization=True)
    log.info("wrote tiny %s model (seed %d, vocab %d) to %s", arch, seed, trained_vocab, out)
    return out

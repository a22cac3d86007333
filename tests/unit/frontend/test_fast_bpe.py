"""The tiktoken path for plain text (`tandem.frontend.fast_bpe`): the same ids as the Hugging Face
tokenizer wherever it is used, and the tokenizer's own path wherever it cannot be the same."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers

from tandem.frontend.fast_bpe import PROBES, FastBpe
from tandem.frontend.preprocess import ModelTokenizer
from tandem.models.tiny import train_tokenizer
from tandem.protocol.errors import InvalidRequestError


def _texts(seed: int = 0) -> list[str]:
    """Prose, code, many scripts, odd whitespace, and random code points (each text plain: no
    added token's string in it)."""
    rng = random.Random(seed)
    words = ["the", "The", " capital", "of", "France", "ça", "naïve", "東京", "🙂", "'s", "123", "4.5e-3"]
    words += ["\t", "\n\n"]
    texts = [*PROBES]
    for _ in range(300):
        texts.append("".join(rng.choice(words) + rng.choice(["", " ", "  ", ",", ".\n"]) for _ in range(20)))
        points = [rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)]) for _ in range(40)]
        texts.append("".join(map(chr, points)))
    return texts


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def test_a_byte_level_bpe_gets_the_tiktoken_path_with_the_same_ids(tiny_tokenizer: Tokenizer) -> None:
    bpe = FastBpe.for_tokenizer(tiny_tokenizer)
    assert bpe is not None
    texts = _texts()
    expected = [e.ids for e in tiny_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert bpe.encode_many(texts) == expected


def test_texts_with_an_added_tokens_string_are_left_to_the_tokenizer(tiny_dir: Path) -> None:
    tok = ModelTokenizer(tiny_dir)
    assert tok._bpe is not None
    backend = tok._backend
    assert backend is not None
    special = next(t.content for t in backend.get_added_tokens_decoder().values())
    text = f"before {special} after"
    assert tok._bpe.encode_many(["plain", text]) is None
    # Through the tokenizer, the string is its one token, as in transformers.
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(tok.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert backend.token_to_id(special) in ids


def test_model_tokenizer_ids_equal_transformers_on_the_tiktoken_path(tiny_dir: Path) -> None:
    tok = ModelTokenizer(tiny_dir)
    assert tok._bpe is not None
    for text in _texts(seed=1)[:200]:
        assert tok.encode(text, add_special_tokens=False) == list(
            tok.tokenizer(text, add_special_tokens=False)["input_ids"]
        )


def test_bytes_missing_from_the_vocabulary_leave_their_characters_to_the_tokenizer() -> None:
    # A vocabulary without the bytes 0x04 and 0x06 (SmolLM2 lacks a few control characters): the
    # tokenizer drops such a byte, tiktoken could not, so texts with one go the tokenizer's way.
    # ByteLevel shows the bytes below 0x21 as chr(0x100 + byte): leave those two out.
    shown = set(pre_tokenizers.ByteLevel.alphabet()) - {chr(0x100 + 4), chr(0x100 + 6)}
    tok = train_tokenizer(vocab_size=400)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=sorted(shown), show_progress=False)
    tok.train_from_iterator(["hello world, the capital of France. " * 20, "ça va très bien"], trainer=trainer)
    vocab = tok.get_vocab()
    assert chr(0x100 + 4) not in vocab and chr(0x100 + 6) not in vocab
    bpe = FastBpe.for_tokenizer(tok)
    assert bpe is not None
    assert bpe.encode_many(["a\x04b"]) is None
    assert bpe.encode_many(["a\x05b"]) == [tok.encode("a\x05b", add_special_tokens=False).ids]


def test_other_tokenizer_shapes_keep_the_tokenizers_path(tiny_tokenizer: Tokenizer) -> None:
    # A normalizer tiktoken would not apply.
    normalized = Tokenizer.from_str(tiny_tokenizer.to_str())
    normalized.normalizer = normalizers.NFKC()
    assert FastBpe.for_tokenizer(normalized) is None
    # Merges not in id order: tiktoken merges by the result's id, the tokenizer by the merge's rank.
    spec = json.loads(tiny_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[10], merges[20] = merges[20], merges[10]
    assert FastBpe.for_tokenizer(Tokenizer.from_str(json.dumps(spec))) is None
    # A pre-tokenizer that adds a prefix space.
    spaced = Tokenizer.from_str(tiny_tokenizer.to_str())
    spaced.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert FastBpe.for_tokenizer(spaced) is None


def test_tandem_tiktoken_0_keeps_the_tokenizers_path(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_TIKTOKEN", "0")
    tok = ModelTokenizer(tiny_dir)
    assert tok._bpe is None
    assert tok.encode("the capital of France", add_special_tokens=False) == list(
        tok.tokenizer("the capital of France", add_special_tokens=False)["input_ids"]
    )


def test_a_lone_surrogate_is_a_clear_invalid_request(tiny_dir: Path) -> None:
    # JSON's "\ud800" escape decodes to a lone surrogate: no tokenizer takes it, so it is the client's
    # error (400), on either path, not tiktoken's replacement character.
    tok = ModelTokenizer(tiny_dir)
    assert tok._bpe is not None and tok._bpe.encode_many(["a\ud800b"]) is None
    with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate"):
        tok.encode("a\ud800b", add_special_tokens=False)

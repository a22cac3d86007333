"""The chat piece cache gives exactly the whole-text ids, reuses earlier messages, stays bounded,
and refuses tokenizers whose pieces do not encode on their own."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tandem.frontend.chat_tokens import ENTRY_CHARS, PieceCache
from tandem.frontend.preprocess import ModelTokenizer
from tandem.protocol.openai import ChatMessage

ALPHABET = "abcdefghij klmnop\n\t  ,.!?'0123456789éüß😀日本—“”<>|"


@pytest.fixture
def tok(tiny_dir: Path) -> ModelTokenizer:
    return ModelTokenizer(tiny_dir)  # a fresh, empty cache per test


def random_text(rng: random.Random, added: list[str]) -> str:
    pieces = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))]
    if rng.random() < 0.2:  # users may type an added token's text: it is that token either way
        pieces.append(rng.choice(added))
    pieces.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20))))
    return "".join(pieces)


def whole_ids(tok: ModelTokenizer, text: str) -> list[int]:
    return list(tok.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_tiny_tokenizer_gets_a_cache_unless_turned_off(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ModelTokenizer(tiny_dir)._pieces is not None
    monkeypatch.setenv("TANDEM_CHAT_TOKEN_CACHE_CHARS", "0")
    assert ModelTokenizer(tiny_dir)._pieces is None


async def test_random_conversations_match_whole_text_encoding(tok: ModelTokenizer) -> None:
    assert tok._pieces is not None
    added = list(tok._pieces._added)
    rng = random.Random(0)
    for _ in range(30):
        messages = [ChatMessage(role="system", content=random_text(rng, added))]
        for _turn in range(4):
            messages.append(ChatMessage(role="user", content=random_text(rng, added)))
            text = tok.render_chat(messages)
            assert await tok.encode_chat(text) == whole_ids(tok, text)
            messages.append(ChatMessage(role="assistant", content=random_text(rng, added)))


async def test_later_turns_reuse_earlier_messages(tok: ModelTokenizer) -> None:
    cache = tok._pieces
    assert cache is not None
    messages = [
        ChatMessage(role="system", content="You are a careful assistant. " * 20),
        ChatMessage(role="user", content="First question, a long one. " * 30),
    ]
    await tok.encode_chat(tok.render_chat(messages))
    encoded_first = cache.misses
    messages.append(ChatMessage(role="assistant", content="An answer."))
    messages.append(ChatMessage(role="user", content="More?"))
    text = tok.render_chat(messages)
    parts = cache.split(text)
    new = cache.missing(parts)
    # Only the new turn's text is encoded: the system prompt and first question come from the cache.
    assert all("careful assistant" not in p and "First question" not in p for p in new)
    hits_before = cache.hits
    assert cache.assemble(parts, cache.encode_missing(new)) == whole_ids(tok, text)
    assert cache.hits > hits_before
    assert cache.misses == encoded_first + len(new)


def test_cache_is_bounded_and_evicts_oldest_first(tiny_dir: Path) -> None:
    tok = ModelTokenizer(tiny_dir)
    assert tok._pieces is not None
    cache = PieceCache(tok._pieces._added, tok._encode_many, max_chars=4 * ENTRY_CHARS)
    texts = [f"piece number {i} " * 3 for i in range(10)]
    for t in texts:
        assert cache.encode(t) == whole_ids(tok, t)
    assert cache._chars <= cache.max_chars
    assert list(cache._ids) == texts[-4:]
    # A piece larger than the whole budget is encoded but never cached.
    big = "x" * (5 * ENTRY_CHARS)
    assert cache.encode(big) == whole_ids(tok, big)
    assert big not in cache._ids


def test_a_piece_evicted_while_another_request_encodes_is_encoded_again(tok: ModelTokenizer) -> None:
    cache = tok._pieces
    assert cache is not None
    text = tok.render_chat([ChatMessage(role="user", content="hello there, general")])
    cache.encode(text)
    parts = cache.split(text)
    assert cache.missing(parts) == []  # all cached now...
    cache._ids.clear()  # ...then evicted (another request filled the cache) before assembly
    assert cache.assemble(parts, {}) == whole_ids(tok, text)


class _Added:
    def __init__(self, content: str, **flags: bool) -> None:
        self.content = content
        self.lstrip = flags.get("lstrip", False)
        self.rstrip = flags.get("rstrip", False)
        self.single_word = flags.get("single_word", False)
        self.normalized = flags.get("normalized", False)


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _FirstPieceBackend:
    """Encodes like a tokenizer that marks only the start of the whole text (e.g. SentencePiece's
    Metaspace with prepend_scheme "first"): pieces encoded alone each get the mark."""

    def __init__(self, mark: bool = True, **flags: bool) -> None:
        self.mark = mark
        self.added = {0: _Added("<s>", **flags)}

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return self.added

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        ids = [1] if self.mark else []  # the start mark
        for piece in text.split("<s>"):
            ids += [ord(c) for c in piece] + [0]
        return _Encoding(ids[:-1])


def test_tokenizers_that_do_not_encode_piecewise_get_no_cache() -> None:
    backend = _FirstPieceBackend()

    def encode_many(texts: list[str]) -> list[list[int]]:
        return [backend.encode(t).ids for t in texts]

    def render(conv: list[dict[str, str]]) -> str:
        return "".join(f"<s>{m['role']}\n{m['content']}" for m in conv) + "<s>assistant\n"

    assert PieceCache.for_tokenizer(backend, encode_many, render, 1000) is None  # the self-test fails
    plain = _FirstPieceBackend(mark=False)
    plain_many = lambda ts: [plain.encode(t).ids for t in ts]  # noqa: E731
    assert PieceCache.for_tokenizer(plain, plain_many, render, 1000) is not None
    for flag in ("lstrip", "rstrip", "single_word", "normalized"):
        flagged = _FirstPieceBackend(**{flag: True})
        assert PieceCache.for_tokenizer(flagged, encode_many, render, 1000) is None
    assert PieceCache.for_tokenizer(backend, encode_many, None, 1000) is None  # no chat template

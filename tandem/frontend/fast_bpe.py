"""FastBpe: a byte-level BPE tokenizer's plain-text ids computed by tiktoken, where they are the same.

    bpe = FastBpe.for_tokenizer(backend)     # backend: a `tokenizers.Tokenizer`; None if not usable
    ids = bpe.encode_many(texts)             # as backend.encode(t, add_special_tokens=False).ids,
                                             # or None for texts the caller must encode itself

Why: a frontend process takes a closed loop's turnover of requests one after another, and the
Hugging Face tokenizer was about two thirds of each request's intake: 150-200 us for a fresh
100-token prompt here, against 50 us for tiktoken's encoder built from the same vocabulary and
merges (identical ids). The last request of a turnover reaches its engine that much sooner, and the
whole turnover's prefill waits for it (docs/benchmarks.md, session 30). Written here, not found in a
library: the conversion of a Hugging Face byte-level BPE to tiktoken's ranks is ~20 lines.

Exactness is checked, not assumed. `for_tokenizer` returns None unless the tokenizer has the shape
tiktoken implements: a byte-level BPE (GPT-2's byte-to-character table) with no normalizer, dropout,
byte fallback or subword affixes, pre-tokenized by GPT-2's regex or by one Split regex before a
ByteLevel step without its own, whose merges create tokens in id order (tiktoken merges the adjacent
pair whose result has the lowest id; Hugging Face the pair listed first). Then both encoders run over
every vocabulary entry that is text, each merge's halves side by side, and a mixed probe corpus; one
difference and it is not used. Left to the caller: texts holding an added token's string (Hugging
Face makes it that token), texts with a character made of a byte the vocabulary lacks (Hugging Face
drops the byte; SmolLM2 lacks a few control characters), and texts with a lone UTF-16 surrogate
(Hugging Face refuses them; tiktoken would encode U+FFFD).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from typing import Any

from tandem.frontend.detokenize import byte_alphabet

log = logging.getLogger(__name__)

LONE_SURROGATE = "[\ud800-\udfff]"
"""Characters no tokenizer takes (JSON's \\ud800 escapes can carry them into a prompt)."""

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The pre-tokenizer regex of a Hugging Face `ByteLevel(use_regex=True)` step (GPT-2's)."""

PROBES = (
    "Hello, world! 123 4567 89.0e-3",
    "  leading and trailing spaces  \n\n\ttabs\tand\r\nnewlines \u00a0nbsp",
    "Don't you'll we've I'm they'd it's O'Neil's 'quoted'",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A: pass",
    "Ünïcödé naïve café — “quotes” … ½ № ™ €100",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Здравствуй, мир! Ελληνικά. עברית. العربية. हिन्दी",
    "emoji 🙂🚀👍🏽 and ZWJ 👨‍👩‍👧 family",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "URL https://example.com/path?q=1&r=two#frag mail@example.org 192.168.0.1",
    "                                                                 many spaces",
    "1234567890123456789012345678901234567890 0.000001 -42 +7",
)


def _pattern(pre: Any) -> str | None:
    """The pre-tokenizer's regex when it is one tiktoken applies the same way, else None."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, level = pre["pretokenizers"]
    if (
        level.get("type") != "ByteLevel"
        or level.get("use_regex", True)
        or level.get("add_prefix_space")
        or split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split.get("pattern", {})
    ):
        return None
    return str(split["pattern"]["Regex"])


def _missing_chars(missing: list[int]) -> str | None:
    """A regex character class of the characters whose UTF-8 bytes include a byte the vocabulary
    lacks (Hugging Face drops such a byte; tiktoken cannot), "" if none can occur; None if a
    continuation byte is missing (too many characters to exclude)."""
    ranges: list[str] = []
    for b in missing:
        if b < 0x80:
            ranges.append(re.escape(chr(b)))
        elif b < 0xC0:
            return None
        elif 0xC2 <= b <= 0xF4:  # a lead byte: every character it starts
            if b < 0xE0:
                lo, span = (b & 0x1F) << 6, 1 << 6
            elif b < 0xF0:
                lo, span = (b & 0x0F) << 12, 1 << 12
            else:
                lo, span = (b & 0x07) << 18, 1 << 18
            ranges.append(f"{re.escape(chr(max(lo, 0x80)))}-{re.escape(chr(min(lo + span - 1, 0x10FFFF)))}")
        # 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8.
    return f"[{''.join(ranges)}]" if ranges else ""


class FastBpe:
    def __init__(self, encoding: Any, added: set[str], missing: str) -> None:
        self._encode = encoding.encode_ordinary
        # Texts the caller must encode itself: an added token's string, a character whose bytes the
        # vocabulary lacks, or a lone surrogate (not Unicode the tokenizer takes; tiktoken would
        # encode U+FFFD in its place).
        parts = [*map(re.escape, sorted(added, key=len, reverse=True)), *([missing] if missing else [])]
        self._leave = re.compile("|".join([*parts, LONE_SURROGATE]))

    @classmethod
    def for_tokenizer(cls, backend: Any) -> FastBpe | None:
        """A tiktoken encoder equal to `backend` on plain text, or None (see the module docstring)."""
        try:
            import tiktoken
        except ImportError:
            return None
        try:
            spec = json.loads(backend.to_str())
            built = cls._build(tiktoken, spec)
        except Exception as e:  # an unexpected tokenizer file: keep the Hugging Face path
            log.info("tiktoken path not used: %s", e)
            return None
        if built is None:
            return None
        bpe, texts = built
        if not bpe._same_as(backend, texts):
            log.warning("tiktoken path not used: its ids differ from the tokenizer's")
            return None
        return bpe

    @classmethod
    def _build(cls, tiktoken: Any, spec: dict[str, Any]) -> tuple[FastBpe, list[str]] | None:
        model = spec.get("model") or {}
        pattern = _pattern(spec.get("pre_tokenizer"))
        if (
            model.get("type") != "BPE"
            or pattern is None
            or spec.get("normalizer") is not None
            or model.get("dropout")
            or model.get("byte_fallback")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
        ):
            return None
        chars = {c: b for b, c in enumerate(byte_alphabet())}
        vocab: dict[str, int] = model["vocab"]
        added = {t["content"] for t in spec.get("added_tokens", [])}
        ranks: dict[bytes, int] = {}
        for token, i in vocab.items():
            if token in added:
                continue
            if any(c not in chars for c in token):
                return None  # not GPT-2's byte alphabet
            ranks[bytes(chars[c] for c in token)] = i
        missing = _missing_chars([b for b in range(256) if bytes([b]) not in ranks])
        if missing is None or len(ranks) != len({*ranks.values()}):
            return None
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        merged = [vocab.get("".join(pair), -1) for pair in pairs]
        if -1 in merged or any(a >= b for a, b in itertools.pairwise(merged)):
            return None  # tiktoken would merge in another order
        encoding = tiktoken.Encoding("tandem-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        # Every vocabulary entry that is text, and every merge's two halves side by side.
        texts = [t for t in (_text(b) for b in ranks) if t]
        for pair in pairs:
            joined = _text(bytes(chars[c] for c in "".join(pair)))
            if joined:
                texts.append(joined + " " + joined)
        return cls(encoding, added, missing), [*texts, *PROBES]

    def _same_as(self, backend: Any, texts: list[str]) -> bool:
        plain = [t for t in texts if not self._leave.search(t)]
        expected = backend.encode_batch(plain, add_special_tokens=False)
        return all(self._encode(t) == e.ids for t, e in zip(plain, expected, strict=True))

    def encode_many(self, texts: list[str]) -> list[list[int]] | None:
        """Each text's ids, as the tokenizer's `encode(text, add_special_tokens=False)`; None if a
        text holds an added token's string (the tokenizer would make it that token), a character
        with a byte the vocabulary lacks (the tokenizer drops it) or a lone surrogate."""
        leave = self._leave
        if any(leave.search(t) for t in texts):
            return None
        return [self._encode(t) for t in texts]


def _text(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None

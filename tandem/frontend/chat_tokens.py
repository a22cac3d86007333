"""Chat prompt tokenization that reuses the token ids of earlier messages.

A chat's rendered prompt is special tokens (`<|im_start|>`, `<|eot_id|>`, ...) with text between
them, and a Hugging Face tokenizer encodes each stretch of text between added tokens on its own: it
cuts the text at its added tokens first, then normalizes, pre-tokenizes and runs the model on each
piece. So the ids of a piece depend only on the piece, and a multi-turn conversation, which sends
every earlier message again each turn, needs only its new pieces encoded. `PieceCache` keeps the ids
of recent pieces (LRU, bounded in characters) and assembles a prompt from cached pieces, the added
tokens' ids and the newly encoded pieces.

Why by hand: neither `tokenizers` nor `transformers` caches across calls above the word level (the
BPE model caches words), and BPE over a long conversation costs ~1-2 us a token on one core; a
10-turn, 7k-token chat pays that on every turn, on the frontend's event loop.

Exactness is checked, not assumed. `PieceCache.for_tokenizer` returns None (callers then encode the
whole text) unless every added token is matched as plain text (no lstrip / rstrip / single_word, not
normalized), and a self-test over probe conversations, rendered with the model's own chat template,
gives exactly the whole-text ids. A pre-tokenizer that treats the text's first piece differently
(SentencePiece's Metaspace with prepend_scheme "first") fails that test and is not cached.
"""

from __future__ import annotations

import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from tandem.frontend.chat_template import PROBE_TEXTS, probe_conversations

EncodeMany = Callable[[list[str]], list[list[int]]]
"""Token ids of each text, no special tokens added (one batched tokenizer call)."""

ENTRY_CHARS = 64
"""Each entry counts at least this many characters, so many tiny pieces stay bounded too."""


class PieceCache:
    """Token ids of the text pieces between added tokens, by piece (see the module docstring)."""

    def __init__(self, added: dict[str, int], encode_many: EncodeMany, max_chars: int) -> None:
        self._added = added
        # Longest first: at one position the longest added token wins, as in the tokenizer.
        alternatives = sorted(added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")").split
        self._encode_many = encode_many
        self._ids: OrderedDict[str, array] = OrderedDict()
        self._chars = 0
        self.max_chars = max_chars
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tokenizer(
        cls,
        backend: Any,
        encode_many: EncodeMany,
        render: Callable[[list[dict[str, str]]], str] | None,
        max_chars: int,
    ) -> PieceCache | None:
        """A cache of `max_chars` characters of text (0: none) for a `tokenizers.Tokenizer` whose
        piecewise ids equal its whole-text ids, else None. `render` turns messages into the chat
        template's text (None: no template)."""
        if render is None or max_chars <= 0:
            return None
        added: dict[str, int] = {}
        for token_id, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized or not tok.content:
                return None
            added[tok.content] = token_id
        if not added:
            return None
        cache = cls(added, encode_many, max_chars)
        for text in _probe_prompts(render):
            if cache.encode(text) != list(backend.encode(text, add_special_tokens=False).ids):
                return None
        cache._ids.clear()
        cache._chars = cache.hits = cache.misses = 0
        return cache

    def split(self, text: str) -> list[str]:
        """Text pieces at even positions (possibly empty), added tokens at odd positions."""
        return self._split(text)

    def missing(self, parts: Sequence[str]) -> list[str]:
        """The distinct text pieces of `parts` that are not cached, in order."""
        seen: dict[str, None] = {}
        for piece in parts[0::2]:
            if piece and piece not in self._ids:
                seen[piece] = None
        return list(seen)

    def assemble(self, parts: Sequence[str], new: dict[str, list[int]]) -> list[int]:
        """The prompt's ids from cached pieces, added tokens and `new` (piece -> ids, just encoded),
        which are then cached."""
        out: list[int] = []
        for i, piece in enumerate(parts):
            if i % 2:
                out.append(self._added[piece])
            elif piece:
                ids = new.get(piece)
                if ids is not None:
                    out.extend(ids)
                    continue
                cached = self._ids.get(piece)
                if cached is None:  # evicted by another request while this one was encoding
                    new[piece] = ids = self._encode_many([piece])[0]
                    out.extend(ids)
                    continue
                self._ids.move_to_end(piece)
                self.hits += 1
                out.extend(cached)
        for piece, ids in new.items():
            self._put(piece, ids)
        self.misses += len(new)
        return out

    def encode(self, text: str) -> list[int]:
        """`assemble` with the missing pieces encoded in this thread."""
        parts = self.split(text)
        return self.assemble(parts, self.encode_missing(self.missing(parts)))

    def encode_missing(self, missing: list[str]) -> dict[str, list[int]]:
        """Encode `missing` (safe to run in another thread: it touches no cache state)."""
        if not missing:
            return {}
        return dict(zip(missing, self._encode_many(missing), strict=True))

    def _put(self, piece: str, ids: list[int]) -> None:
        cost = max(len(piece), ENTRY_CHARS)
        if cost > self.max_chars or piece in self._ids:
            return
        self._ids[piece] = array("i", ids)  # 4 bytes a token id
        self._chars += cost
        while self._chars > self.max_chars:
            old, _ = self._ids.popitem(last=False)
            self._chars -= max(len(old), ENTRY_CHARS)


def _probe_prompts(render: Callable[[list[dict[str, str]]], str]) -> list[str]:
    """The probe chats, rendered (`tandem.frontend.chat_template.probe_conversations`), and the
    probe texts on their own."""
    prompts = []
    for chat in probe_conversations():
        try:
            prompts.append(render(chat))
        except Exception:  # a template may refuse a role (e.g. no system); the others still probe
            continue
    prompts.extend(PROBE_TEXTS)
    return prompts

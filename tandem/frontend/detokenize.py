"""Token ids -> text deltas, one request at a time, with OpenAI stop strings.

Contracts:
- `IncrementalDetokenizer`: the concatenation of every `step()` result and then `flush()` equals
  `tokenizer.decode(all_ids, skip_special_tokens=True)` for prefix-stable decoders (byte-level BPE,
  byte-fallback SentencePiece). A delta never ends inside a UTF-8 character: bytes of an unfinished
  character are held back (the step returns "") until the token that completes it arrives.
- `StopStrings`: text is released only when no stop string can still begin inside it; when a stop
  string appears (even split over several deltas) the text before it is released and the rest is
  dropped, as OpenAI trims the stop string from the output.

The standard technique (HF TextStreamer, vLLM): keep a prefix offset and a read offset into the ids;
decode ids[prefix:] and ids[prefix:read], and emit the difference unless it ends in U+FFFD:

    ids:    ... | prefix ... read | new ids |
                 `-- context --'  `- emitted if complete -'

With a Rust `tokenizers` backend the same algorithm runs inside `tokenizers.decoders.DecodeStream`
(one native call per engine output); other tokenizers use the Python version.

Byte-level BPE (GPT-2, Llama 3, SmolLM2: a `ByteLevel` decoder and nothing else) needs neither: a
token always stands for the same bytes, so a step is a table lookup and the standard library's
incremental UTF-8 decoder, which holds back an unfinished character and replaces invalid bytes as
`tokenizers` does. Per token that is about a third of a `DecodeStream.step` call; detokenizing
was an eighth of a busy frontend's CPU (docs/benchmarks.md, session 22). `byte_table` builds the
table once per tokenizer; `ModelTokenizer` builds it at load.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"

_TABLES: weakref.WeakKeyDictionary[Any, tuple[bytes, ...] | None] = weakref.WeakKeyDictionary()
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def byte_alphabet() -> str:
    """The byte-level alphabet: the character standing for each byte, in byte order. Printable bytes
    stand for themselves, the others (space included) for code points from U+0100 on (GPT-2's
    `bytes_to_unicode`)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(256, 512))
    return "".join(chr(b) if b in printable else chr(next(extra)) for b in range(256))


def byte_table(tokenizer: Any) -> tuple[bytes, ...] | None:
    """The bytes each token id decodes to with `skip_special_tokens` (special ones: none), when the
    tokenizer's decoder is byte-level alone; else None. Built once per tokenizer object."""
    try:
        return _TABLES[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: build without caching
        return _build_byte_table(tokenizer)
    table = _TABLES[tokenizer] = _build_byte_table(tokenizer)
    return table


def _build_byte_table(tokenizer: Any) -> tuple[bytes, ...] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if backend is None or decoder is None:
        return None
    try:
        spec = json.loads(decoder.__getstate__())
    except (ValueError, TypeError, AttributeError):
        return None
    steps = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    if [d.get("type") for d in steps] != ["ByteLevel"]:
        return None
    alphabet = byte_alphabet()
    to_latin1 = str.maketrans({c: chr(b) for b, c in enumerate(alphabet)})
    outside = re.compile(f"[^{re.escape(alphabet)}]")
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    table = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(i)
        if token is None or i in special:
            table.append(b"")
        elif outside.search(token):
            # As the ByteLevel decoder does: a token with a character outside the alphabet (an
            # added token's plain text) stands for its own UTF-8, not for bytes character by character.
            table.append(token.encode())
        else:
            table.append(token.translate(to_latin1).encode("latin-1"))
    return tuple(table)


class IncrementalDetokenizer:
    """Detokenizes one request's output ids as they arrive (see the module contract)."""

    __slots__ = (
        "_backend",
        "_ids",
        "_n_chars",
        "_pending",
        "_prefix",
        "_read",
        "_stream",
        "_table",
        "_tokenizer",
        "_utf8",
    )

    def __init__(self, tokenizer: Any, *, force_python: bool = False, force_stream: bool = False) -> None:
        """`force_python` / `force_stream`: the Python or `DecodeStream` version even where a byte
        table would do (tests compare all three)."""
        self._tokenizer = tokenizer
        self._table = None if force_python or force_stream else byte_table(tokenizer)
        self._utf8 = _utf8_decoder("replace") if self._table is not None else None
        self._ids: list[int] = []
        self._n_chars = 0
        self._pending = False
        self._prefix = 0
        self._read = 0
        native = not force_python and self._table is None
        backend = getattr(tokenizer, "backend_tokenizer", None) if native else None
        self._backend = backend
        self._stream: Any = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, new_ids: Sequence[int]) -> str:
        """Feed the ids new since the last call; return the text they complete ("" if none yet)."""
        if not new_ids:
            return ""
        if self._utf8 is not None:
            table = self._table
            assert table is not None
            n = len(table)
            if len(new_ids) == 1:
                i = new_ids[0]
                data = table[i] if 0 <= i < n else b""  # an id past the vocabulary decodes to nothing
            else:
                data = b"".join([table[i] for i in new_ids if 0 <= i < n])
            return str(self._utf8.decode(data))
        self._ids.extend(new_ids)
        if self._stream is not None:
            text = self._stream.step(self._backend, list(new_ids))
            if text is None:
                self._pending = True
                return ""
            self._pending = False
            self._n_chars += len(text)
            return str(text)
        return self._python_step()

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end decodes to U+FFFD)."""
        if self._utf8 is not None:
            return str(self._utf8.decode(b"", True))
        if self._stream is not None:
            if not self._pending:
                return ""
            self._pending = False
            full = self._decode(self._ids)
            tail = full[self._n_chars :]
            self._n_chars = len(full)
            return tail
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]

    def _python_step(self) -> str:
        ids = self._ids
        prefix_text = self._decode(ids[self._prefix : self._read])
        text = self._decode(ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT):
            self._prefix = self._read
            self._read = len(ids)
            return text[len(prefix_text) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


class StopStrings:
    """Finds OpenAI `stop` strings in streamed text; holds back text that could start one."""

    __slots__ = ("_held", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must be non-empty"
        self.stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was found).

        After a stop, the caller ends the request: the stop string and all text after it are
        dropped. Only `held + text` is searched: earlier text was released because no stop string
        could begin in it, so no match can start there.
        """
        buf = self._held + text
        first = -1
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            return buf[:first], True
        keep = 0
        for s in self.stops:
            # The longest proper prefix of `s` that ends `buf` must wait for more text.
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        """Text held back at the end of the stream (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return held


class TextStream:
    """One request's output side: detokenizer + stop strings + counts (+ per-token logprobs).

    `push(ids)` returns (delta, stopped); on `stopped` the caller closes the backend stream and
    reports finish_reason "stop". `finish()` returns the last text when the engine ended the request.
    Stop strings are not looked for before `min_tokens` tokens, as the engine ignores EOS until then.
    """

    __slots__ = ("_detok", "_min_tokens", "_stops", "num_tokens", "token_ids")

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0, keep_ids: bool = False
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stop) if stop else None
        self._min_tokens = min_tokens
        self.num_tokens = 0
        self.token_ids: list[int] | None = [] if keep_ids else None

    def push(self, ids: Sequence[int]) -> tuple[str, bool]:
        self.num_tokens += len(ids)
        if self.token_ids is not None:
            self.token_ids.extend(ids)
        text = self._detok.step(ids)
        if self._stops is None or self.num_tokens < self._min_tokens or not text:
            return text, False
        return self._stops.feed(text)

    def finish(self) -> str:
        text = self._detok.flush()
        if self._stops is None:
            return text
        if text and self.num_tokens >= self._min_tokens:
            out, stopped = self._stops.feed(text)
            if stopped:
                return out
            return out + self._stops.flush()
        return self._stops.flush() + text

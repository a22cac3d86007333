"""OpenAI request -> (prompt token ids, SamplingSpec): chat templates, tokenization, validation.

Contracts:
- Chat prompts are rendered exactly as transformers does (`apply_chat_template(messages,
  add_generation_prompt=True)`; `ChatTemplate` calls its compiled template directly when a
  self-check allows) and tokenized without adding special tokens, as transformers does for
  `tokenize=True`: the template already wrote them.
- Completion prompts are tokenized with the tokenizer's own special-token rule (`tokenizer(prompt)`);
  token-id prompts pass through.
- A prompt that does not fit the context is a 400 naming both lengths. `max_tokens` past the context
  is clamped to what fits (the request then ends with finish_reason "length"); no `max_tokens` means
  "up to the context" for chat and 16 for completions, as OpenAI's defaults.
- Every other out-of-range field is a 400 naming the field (`FieldError`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem import env
from tandem.frontend.chat_template import ChatTemplate
from tandem.frontend.chat_tokens import PieceCache
from tandem.frontend.detokenize import byte_table
from tandem.frontend.errors import FieldError
from tandem.frontend.fast_bpe import LONE_SURROGATE, FastBpe
from tandem.frontend.microbatch import MicrobatchEncoder
from tandem.protocol.errors import CheckpointError, InvalidRequestError
from tandem.protocol.messages import SamplingSpec
from tandem.protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest

log = logging.getLogger(__name__)

_SURROGATE = re.compile(LONE_SURROGATE)

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5
_GIL_BOUND_THREAD_CHARS = 32_768
"""A tokenizer that holds the GIL (transformers' Python one) goes to a thread only past this length:
there it protects the streams from one long prompt, and for short ones a thread would only add a hop."""
_INLINE_BATCH_CHARS = 24_576
_INLINE_TEXT_CHARS = 4_096
"""The largest gathered batch, and the longest text in it, encoded on the event loop (anything larger
goes to a tokenizer thread). Here one Rust batch call took 3.1 ms for 32 chat prompts of ~114 tokens
(20.8k characters, spread over the cores), 0.64 ms for one text of 4k characters, and 4.9 ms for one
of 24k (a single text runs on one core)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request, ready for the backend."""

    prompt_ids: list[int]
    sampling: SamplingSpec
    stop: tuple[str, ...]
    logprobs: bool


class ModelTokenizer:
    """One model's tokenizer and chat template, loaded from local files only."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self._template = ChatTemplate.for_tokenizer(self.tokenizer) if self.has_chat_template else None
        byte_table(self.tokenizer)  # now, not on the first request's first token
        self._token_text: dict[int, str] = {}
        # The Rust tokenizer skips transformers' Python layer (~15% of encode time); use it only when
        # it agrees with `tokenizer(...)` on special tokens, which transformers may add in Python.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        probe = "Hello, world! 123"
        self._backend = (
            backend
            if backend is not None
            and backend.encode(probe).ids == list(self.tokenizer(probe)["input_ids"])
            and backend.encode(probe, add_special_tokens=False).ids
            == list(self.tokenizer(probe, add_special_tokens=False)["input_ids"])
            else None
        )
        self._fast_encode = getattr(self._backend, "encode_batch_fast", None)  # tokenizers >= 0.21
        # Plain text through tiktoken where its ids are the tokenizer's (checked): a third of the CPU.
        use_bpe = self._backend is not None and env.tiktoken_enabled()
        self._bpe = FastBpe.for_tokenizer(self._backend) if use_bpe else None
        # The Rust batch calls release the GIL: on a tokenizer thread they run beside the event loop.
        self._batcher = (
            MicrobatchEncoder(
                self._encode_many,
                _tokenize_threads(),
                _TOKENIZE_THREADS,
                inline_chars=_INLINE_BATCH_CHARS,
                inline_text_chars=_INLINE_TEXT_CHARS,
            )
            if self._fast_encode is not None
            else None
        )
        self._batch_chars = (
            env.tokenize_batch_chars()
            if self._batcher is not None
            else max(env.tokenize_batch_chars(), _GIL_BOUND_THREAD_CHARS)
        )
        self._pieces = (
            PieceCache.for_tokenizer(
                self._backend, self._encode_many, self._template, env.chat_token_cache_chars()
            )
            if self._backend is not None and self._template is not None
            else None
        )
        log.info(
            "loaded tokenizer from %s (fast path %s, tiktoken %s, chat template direct %s, "
            "chat pieces cached %s)",
            path,
            self._backend is not None,
            self._bpe is not None,
            self._template is not None and self._template.direct,
            self._pieces is not None,
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._encode_many([text], add_special_tokens)[0]

    def _encode_many(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Ids of each text, in one call (the Rust tokenizer's batch calls release the GIL).
        Raises InvalidRequestError for text that is not Unicode a tokenizer takes (a lone UTF-16
        surrogate, which JSON's \\ud800 escapes can carry)."""
        if self._bpe is not None and not add_special_tokens:
            ids = self._bpe.encode_many(texts)
            if ids is not None:
                return ids
        try:
            return self._encode_slow(texts, add_special_tokens)
        except (TypeError, UnicodeError):
            if any(_SURROGATE.search(t) for t in texts):
                raise InvalidRequestError(
                    "the prompt is not valid Unicode: it holds a lone UTF-16 surrogate (U+D800-U+DFFF)"
                ) from None
            raise

    def _encode_slow(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if self._fast_encode is not None:
            # The same ids without offsets and word ids: ~40% less CPU than `encode` on 100 tokens.
            return [list(e.ids) for e in self._fast_encode(texts, add_special_tokens=add_special_tokens)]
        if self._backend is not None:
            return [
                list(e.ids) for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            ]
        return [list(self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]

    async def _encode_batched(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """`_encode_many` with the texts of the requests that arrive together (`MicrobatchEncoder`);
        without the Rust fast path, on a tokenizer thread."""
        if self._batcher is not None:
            return await self._batcher.encode(texts, add_special_tokens)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_tokenize_threads(), self._encode_many, texts, add_special_tokens)

    def _batched(self, alone: bool, chars: int) -> bool:
        """Tokenize `chars` characters together with the other prompts arriving now (True), or at
        once on the event loop: batched unless the text is short or the request is `alone`.

        Up to `tokenize_batch_chars` (default 4,096) a text is encoded at once: waiting for the rest
        of a burst cost more than it saved once routers pick workers early and idle engines regroup
        their prefills (`tandem.frontend.microbatch`). A longer text waits for the others and goes
        to a tokenizer thread with them, so the event loop keeps streaming. With no other request in
        flight there is no burst to wait for.
        """
        return chars > self._batch_chars and not alone

    async def encode_async(self, text: str, add_special_tokens: bool, alone: bool = False) -> list[int]:
        """`encode`, batched with the prompts arriving now unless short or `alone` (see `_batched`)."""
        if not self._batched(alone, len(text)):
            return self.encode(text, add_special_tokens)
        return (await self._encode_batched([text], add_special_tokens))[0]

    async def encode_chat(self, text: str, alone: bool = False) -> list[int]:
        """A rendered chat prompt's ids, as `encode(text, False)`; earlier messages' pieces come
        from the piece cache when the tokenizer allows it (`tandem.frontend.chat_tokens`)."""
        cache = self._pieces
        if cache is None:
            return await self.encode_async(text, False, alone)
        parts = cache.split(text)
        missing = cache.missing(parts)
        if self._batched(alone, sum(map(len, missing))):
            new = dict(zip(missing, await self._encode_batched(missing, False), strict=True))
        else:
            new = cache.encode_missing(missing)
        return cache.assemble(parts, new)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        if self._template is None:
            raise FieldError("this model has no chat template; use /v1/completions", "messages")
        conv = [_message_dict(m, i) for i, m in enumerate(messages)]
        try:
            return self._template(conv)
        except Exception as e:  # jinja raises TemplateError for e.g. roles that do not alternate
            raise FieldError(f"the chat template rejected the messages: {e}", "messages") from e

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = str(self.tokenizer.decode([token_id]))
        return text


_TOKENIZE_THREADS = min(8, env.usable_cpus())
"""The frontend's tokenizer threads: one per core this process may use, at most 8."""
_tokenize_pool: ThreadPoolExecutor | None = None


def _tokenize_threads() -> ThreadPoolExecutor:
    global _tokenize_pool
    if _tokenize_pool is None:
        _tokenize_pool = ThreadPoolExecutor(_TOKENIZE_THREADS, thread_name_prefix="tandem-tokenize")
    return _tokenize_pool


class TokenizerCache:
    """Loads each model folder's tokenizer once (in a thread: it takes a while), then serves it."""

    def __init__(self) -> None:
        self._loaded: dict[str, ModelTokenizer] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, model_dir: str) -> ModelTokenizer:
        tok = self._loaded.get(model_dir)
        if tok is not None:
            return tok
        lock = self._locks.setdefault(model_dir, asyncio.Lock())
        async with lock:
            tok = self._loaded.get(model_dir)
            if tok is None:
                tok = await asyncio.to_thread(ModelTokenizer, model_dir)
                self._loaded[model_dir] = tok
        return tok


def _message_dict(m: ChatMessage, i: int) -> dict[str, str]:
    """The plain message a chat template sees: str values only, no None (`ChatTemplate`)."""
    content = m.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise FieldError("only text content parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        content = "\n".join(parts)
    out = {"role": m.role, "content": content if content is not None else ""}
    if m.name is not None:
        out["name"] = m.name
    return out


async def chat_prompt_ids(tok: ModelTokenizer, req: ChatCompletionRequest, alone: bool = False) -> list[int]:
    """`alone`: no other request is in flight (see `ModelTokenizer._batched`)."""
    if not req.messages:
        raise FieldError("messages must not be empty", "messages")
    return await tok.encode_chat(tok.render_chat(req.messages), alone)


async def completion_prompt_ids(
    tok: ModelTokenizer, req: CompletionRequest, alone: bool = False
) -> list[int]:
    prompt: Any = req.prompt
    if isinstance(prompt, list):
        if prompt and all(type(t) is int for t in prompt):
            if min(prompt) < 0:
                raise FieldError("prompt token ids must be >= 0", "prompt")
            return list(prompt)
        if len(prompt) != 1:
            raise FieldError(
                "send one prompt per request (a string or a list of token ids); batches are not supported",
                "prompt",
            )
        return await completion_prompt_ids(tok, CompletionRequest(model=req.model, prompt=prompt[0]), alone)
    if not isinstance(prompt, str):
        raise FieldError("prompt must be a string or a list of token ids", "prompt")
    return await tok.encode_async(prompt, True, alone)


def prepare(
    req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], max_model_len: int
) -> Prepared:
    """Validate sampling fields against the prompt and context; raise FieldError on the first bad one."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise FieldError("the prompt is empty: at least one token is needed", "prompt")
    if n_prompt >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {n_prompt} tokens but the model's context length is {max_model_len} "
            f"tokens: at most {max_model_len - 1} prompt tokens fit"
        )
    if req.n != 1:
        raise FieldError(f"only n=1 is supported, got n={req.n}", "n")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise FieldError(f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise FieldError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = 0 if req.top_k is None or req.top_k == -1 else req.top_k
    if top_k < 0:
        raise FieldError(f"top_k must be >= 0 (or -1 for all tokens), got {top_k}", "top_k")
    if req.presence_penalty or req.frequency_penalty:
        raise FieldError("presence_penalty and frequency_penalty are not supported", "presence_penalty")

    room = max_model_len - n_prompt
    if isinstance(req, ChatCompletionRequest):
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        default = room
        logprobs = req.logprobs
        if req.top_logprobs:
            raise FieldError("top_logprobs > 0 is not supported", "top_logprobs")
        _check_output_shape(req)
    else:
        param, asked, default = "max_tokens", req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise FieldError(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}]", "logprobs")
        logprobs = req.logprobs is not None
        if req.echo:
            raise FieldError("echo is not supported", "echo")
    if asked is not None and asked < 1:
        raise FieldError(f"{param} must be >= 1, got {asked}", param)
    max_tokens = min(asked if asked is not None else default, room)
    if req.min_tokens < 0:
        raise FieldError(f"min_tokens must be >= 0, got {req.min_tokens}", "min_tokens")
    if asked is not None and req.min_tokens > asked:
        raise FieldError(f"min_tokens ({req.min_tokens}) must be <= {param} ({asked})", "min_tokens")

    stop = _stop_strings(req.stop)
    stop_ids = req.stop_token_ids or []
    if any(t < 0 for t in stop_ids):
        raise FieldError("stop_token_ids must be >= 0", "stop_token_ids")
    sampling = SamplingSpec(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=req.seed,
        stop_token_ids=list(stop_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        min_tokens=min(req.min_tokens, max_tokens),
    )
    return Prepared(prompt_ids, sampling, stop, logprobs)


def _check_output_shape(req: ChatCompletionRequest) -> None:
    """Refuse what would need guided decoding or a tool-call parser (see `ChatCompletionRequest`)."""
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise FieldError(
            f"response_format {fmt.get('type')!r} needs guided decoding, which is not supported; "
            'send {"type": "text"} or leave it out',
            "response_format",
        )
    if req.functions:
        raise FieldError("function calling is not supported", "functions")
    if req.tools and req.tool_choice != "none":
        raise FieldError(
            'tool calling is not supported (no tool-call parser): send tool_choice "none" or no tools',
            "tool_choice" if req.tool_choice is not None else "tools",
        )


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise FieldError(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop")
    if not all(stops):
        raise FieldError("stop strings must be non-empty", "stop")
    return stops

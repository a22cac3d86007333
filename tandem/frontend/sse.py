"""Server-sent-event chunks as bytes, built from per-request templates.

The fields that never change within a request (id, object, created, model) are encoded once, when
the request starts; each chunk then costs one JSON string encode of the delta text plus a byte join.
No dicts or pydantic models are built per chunk. Chunk shapes follow OpenAI's:

    data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..,
           "choices":[{"index":0,"delta":{"role":"assistant","content":".."},"logprobs":null,"finish_reason":null}]}

The first chat chunk carries the role with the first text, so every engine output is one chunk.
"""

from __future__ import annotations

import msgspec

from tandem.protocol.openai import Usage

_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"
_NULL = b"null"
_FINISH = {
    None: b"null",
    "stop": b'"stop"',
    "length": b'"length"',
    "abort": b'"abort"',
}


def finish_bytes(reason: str | None) -> bytes:
    cached = _FINISH.get(reason)
    return cached if cached is not None else _encode(reason)


class ChunkWriter:
    """Builds one request's SSE chunks. `chat` picks the chat or the completions shape."""

    __slots__ = ("_head", "_mid", "_mid_first", "_tail_open", "_usage_head")

    def __init__(self, *, chat: bool, request_id: str, created: int, model: str) -> None:
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        common = (
            b'{"id":'
            + _encode(request_id)
            + b',"object":"'
            + obj
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + _encode(model)
        )
        self._head = b"data: " + common + b',"choices":[{"index":0,'
        self._usage_head = b"data: " + common + b',"choices":[],"usage":'
        if chat:
            self._mid_first = b'"delta":{"role":"assistant","content":'
            self._mid = b'"delta":{"content":'
            self._tail_open = b'},"logprobs":'
        else:
            self._mid_first = self._mid = b'"text":'
            self._tail_open = b',"logprobs":'

    def chunk(
        self, text: str, finish_reason: str | None, *, first: bool = False, logprobs: bytes = _NULL
    ) -> bytes:
        """One `data:` event carrying `text` (and `finish_reason` on the last one)."""
        return b"".join(
            (
                self._head,
                self._mid_first if first else self._mid,
                _encode(text),
                self._tail_open,
                logprobs,
                b',"finish_reason":',
                finish_bytes(finish_reason),
                b"}]}\n\n",
            )
        )

    @staticmethod
    def with_nvext(event: bytes, nvext: bytes) -> bytes:
        """`event` (from `chunk`) with an `nvext` member (a JSON object) after its choices."""
        assert event.endswith(b"]}\n\n"), "an event from chunk()"
        return event[:-3] + b',"nvext":' + nvext + b"}\n\n"

    def usage(self, usage: Usage) -> bytes:
        """The final chunk OpenAI sends when `stream_options.include_usage` is set: no choices."""
        return self._usage_head + _encode(usage) + b"}\n\n"


def error_event(body: bytes) -> bytes:
    """An error mid-stream, as vLLM and OpenAI send it: an error object, then [DONE]."""
    return b"data: " + body + b"\n\n" + DONE

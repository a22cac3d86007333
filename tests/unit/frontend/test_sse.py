from __future__ import annotations

import json

from tandem.frontend.sse import DONE, ChunkWriter, error_event
from tandem.protocol.openai import PromptTokensDetails, Usage


def _event(data: bytes) -> dict:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[6:-2])


def test_chat_chunks_have_openai_shape() -> None:
    w = ChunkWriter(chat=True, request_id="chatcmpl-1", created=5, model='m"q')
    first = _event(w.chunk('he said "hi"\n', None, first=True))
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": 'm"q',
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": 'he said "hi"\n'},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    last = _event(w.chunk("日本", "length"))
    assert last["choices"][0]["delta"] == {"content": "日本"}
    assert last["choices"][0]["finish_reason"] == "length"


def test_completion_chunks_and_usage() -> None:
    w = ChunkWriter(chat=False, request_id="cmpl-1", created=5, model="m")
    ev = _event(w.chunk("x", "stop", logprobs=b'{"tokens":["x"]}'))
    assert ev["object"] == "text_completion"
    assert ev["choices"] == [
        {"index": 0, "text": "x", "logprobs": {"tokens": ["x"]}, "finish_reason": "stop"}
    ]
    usage = _event(w.usage(Usage(3, 4, 7, PromptTokensDetails(cached_tokens=2))))
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_error_event_ends_with_done() -> None:
    data = error_event(b'{"error":{"message":"x"}}')
    assert data.endswith(DONE)
    assert json.loads(data.split(b"\n\n")[0][6:]) == {"error": {"message": "x"}}

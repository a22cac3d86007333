from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tandem import env
from tandem.frontend import preprocess
from tandem.frontend.errors import FieldError
from tandem.frontend.preprocess import ModelTokenizer, chat_prompt_ids, completion_prompt_ids, prepare
from tandem.protocol.errors import InvalidRequestError
from tandem.protocol.openai import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> ModelTokenizer:
    return ModelTokenizer(tiny_dir)


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)


def completion(**fields: Any) -> CompletionRequest:
    body = {"model": "m", "prompt": "hi", **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=CompletionRequest)


async def test_chat_prompt_matches_transformers(tok: ModelTokenizer, hf_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France? ça va"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?"},
    ]
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert await chat_prompt_ids(tok, chat(messages=messages)) == list(expected)


async def test_chat_content_parts_are_joined(tok: ModelTokenizer) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    plain = await chat_prompt_ids(tok, chat(messages=[{"role": "user", "content": "a\nb"}]))
    assert await chat_prompt_ids(tok, chat(messages=[{"role": "user", "content": parts}])) == plain
    with pytest.raises(FieldError):
        await chat_prompt_ids(tok, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))


async def test_completion_prompt_uses_tokenizer_rule(tok: ModelTokenizer, hf_tokenizer: Any) -> None:
    text = "<|im_start|>Hello, world"
    assert await completion_prompt_ids(tok, completion(prompt=text)) == hf_tokenizer(text)["input_ids"]
    assert await completion_prompt_ids(tok, completion(prompt=[5, 6, 7])) == [5, 6, 7]
    assert await completion_prompt_ids(tok, completion(prompt=[[5, 6]])) == [5, 6]
    assert await completion_prompt_ids(tok, completion(prompt=["hi"])) == hf_tokenizer("hi")["input_ids"]
    with pytest.raises(FieldError):
        await completion_prompt_ids(tok, completion(prompt=["a", "b"]))


def _spy_on_encodes(tok: ModelTokenizer) -> list[tuple[str, int]]:
    """Record each Rust batch call `tok` makes: (the thread it ran on, how many texts)."""
    encode = tok._fast_encode
    assert encode is not None, "the tiny model has a Rust tokenizer"
    calls: list[tuple[str, int]] = []

    def spy(texts: list[str], **kw: Any) -> Any:
        calls.append((threading.current_thread().name, len(texts)))
        return encode(texts, **kw)

    tok._fast_encode = spy
    return calls


async def test_long_prompts_are_batched_and_large_batches_run_beside_the_event_loop(
    tiny_dir: Path, hf_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_TOKENIZE_BATCH_CHARS", "40")
    monkeypatch.setattr(preprocess, "_INLINE_BATCH_CHARS", 300)
    monkeypatch.setattr(preprocess, "_INLINE_TEXT_CHARS", 200)
    tok = ModelTokenizer(tiny_dir)
    calls = _spy_on_encodes(tok)
    loop_thread = threading.current_thread().name
    short, long = "hi there", "the quick brown fox jumps over the lazy dog, " * 3
    assert await tok.encode_async(short, True) == hf_tokenizer(short)["input_ids"]
    assert await tok.encode_async(long, True) == hf_tokenizer(long)["input_ids"]
    assert calls == [(loop_thread, 1), (loop_thread, 1)]  # a batch of one, small: on the loop
    # Three long prompts at once: one batch call of 405 characters, past the inline limit: a thread.
    texts = [long + str(i) for i in range(3)]
    got = await asyncio.gather(*(tok.encode_async(t, True) for t in texts))
    assert got == [hf_tokenizer(t)["input_ids"] for t in texts]
    assert calls[2][0].startswith("tandem-tokenize") and calls[2][1] == 3 and len(calls) == 3
    # One prompt of 270 characters: under the batch limit, but one text runs on one core: a thread.
    assert await tok.encode_async(long * 2, True) == hf_tokenizer(long * 2)["input_ids"]
    assert calls[3][0].startswith("tandem-tokenize") and len(calls) == 4
    messages = [{"role": "user", "content": long + "again"}]
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert await chat_prompt_ids(tok, chat(messages=messages)) == list(expected)
    # Alone (nothing else in flight), a long prompt is encoded at once: no burst to wait for.
    assert await tok.encode_async(long, True, alone=True) == hf_tokenizer(long)["input_ids"]
    assert calls[-1] == (loop_thread, 1)


async def test_by_default_chat_sized_prompts_are_encoded_at_once_and_long_ones_beside_the_loop(
    tiny_dir: Path, hf_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TANDEM_TOKENIZE_BATCH_CHARS", raising=False)
    tok = ModelTokenizer(tiny_dir)
    calls = _spy_on_encodes(tok)
    loop_thread = threading.current_thread().name
    # A burst of ~550-character prompts with other requests in flight: none waits for the others.
    prompts = [f"request {i}: " + "the quick brown fox jumps over the lazy dog. " * 12 for i in range(4)]
    got = await asyncio.gather(*(tok.encode_async(p, True) for p in prompts))
    assert got == [hf_tokenizer(p)["input_ids"] for p in prompts]
    assert calls == [(loop_thread, 1)] * 4
    # Past 4,096 characters a prompt goes to a tokenizer thread, so the streams keep flowing.
    long = "the quick brown fox jumps over the lazy dog. " * 100
    assert await tok.encode_async(long, True) == hf_tokenizer(long)["input_ids"]
    assert calls[-1][0].startswith("tandem-tokenize")


def test_tokenize_batch_chars_must_not_be_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_TOKENIZE_BATCH_CHARS", "-1")
    with pytest.raises(ValueError, match="TANDEM_TOKENIZE_BATCH_CHARS"):
        env.tokenize_batch_chars()
    monkeypatch.delenv("TANDEM_TOKENIZE_BATCH_CHARS")
    assert env.tokenize_batch_chars() == 4096


def test_max_tokens_is_clamped_to_the_context() -> None:
    p = prepare(chat(max_tokens=1000), [1] * 90, max_model_len=100)
    assert p.sampling.max_tokens == 10
    p = prepare(chat(max_completion_tokens=5, max_tokens=50), [1] * 10, max_model_len=100)
    assert p.sampling.max_tokens == 5
    assert prepare(chat(), [1] * 10, max_model_len=100).sampling.max_tokens == 90
    assert prepare(completion(), [1] * 10, max_model_len=100).sampling.max_tokens == 16


def test_prompt_too_long_names_both_lengths() -> None:
    with pytest.raises(InvalidRequestError, match=r"100 tokens.*context length is 100"):
        prepare(chat(), [1] * 100, max_model_len=100)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_sampling_fields_are_rejected(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(FieldError) as err:
        prepare(chat(**fields), [1] * 10, max_model_len=100)
    assert err.value.param == param


def test_text_format_and_unused_tools_are_accepted() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    accepted = [{"response_format": {"type": "text"}}, {"tools": tools, "tool_choice": "none"}, {"tools": []}]
    for fields in accepted:
        assert prepare(chat(**fields), [1] * 10, max_model_len=100).sampling.max_tokens == 90


def test_sampling_fields_map_to_the_spec() -> None:
    p = prepare(
        chat(
            temperature=0,
            top_p=0.5,
            top_k=-1,
            seed=7,
            stop="x",
            stop_token_ids=[9],
            ignore_eos=True,
            min_tokens=2,
        ),
        [1] * 10,
        max_model_len=100,
    )
    s = p.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop_token_ids, s.ignore_eos, s.min_tokens) == (
        0.0,
        0.5,
        0,
        7,
        [9],
        True,
        2,
    )
    assert p.stop == ("x",)
    assert prepare(completion(logprobs=0), [1], 100).logprobs
    assert not prepare(completion(), [1], 100).logprobs

"""The OpenAI frontend over a real uvicorn server on 127.0.0.1, driven by the official `openai` client
(happy paths) and httpx (error paths), over LocalBackend with the simulated engine, plus backend doubles
for failures a real engine cannot be made to show on demand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import SamplingParams
from tandem.frontend.app import create_app
from tandem.frontend.local import LocalBackend
from tandem.models.tiny import write_tiny_model
from tests.integration.servers import (
    CHAT,
    MODEL,
    ThreadedServer,
    chat_body,
    expect_error,
    post_json,
    sim_frontend,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sim_server(tiny_dir: Path) -> Iterator[ThreadedServer]:
    with sim_frontend(tiny_dir, speedup=1000, config=EngineConfig(max_model_len=256), name=MODEL) as server:
        yield server


@pytest.fixture
def client(sim_server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim_server.url + "/v1", api_key="none", max_retries=0)


def _stream_text(stream: Any) -> tuple[str, str | None, Any]:
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text += piece or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_chat_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = _stream_text(stream)
    assert text == full.choices[0].message.content and finish == "length"
    assert usage.completion_tokens == 24 and usage.prompt_tokens == full.usage.prompt_tokens


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "A long and unique prompt about the sea shore. " * 4}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    # The first may hit the default system prompt other tests cached; the repeat hits much more.
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens + 64 <= cached < second.usage.prompt_tokens


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10)
    assert full.object == "text_completion" and full.usage.completion_tokens == 10
    text, finish, usage = _stream_text(
        client.completions.create(
            model=MODEL,
            prompt="The quick brown fox",
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert text == full.choices[0].text and finish == "length" and usage.completion_tokens == 10
    by_ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3)
    assert by_ids.usage.prompt_tokens == 4


def test_default_completion_length_is_16(client: openai.OpenAI) -> None:
    assert client.completions.create(model=MODEL, prompt="hi").usage.completion_tokens == 16


def test_stop_strings_trim_output(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=40).choices[0].text
    stop = full[12:15]
    assert stop.strip() and "\ufffd" not in stop, "pick another slice"
    expected = full[: full.index(stop)]
    short = client.completions.create(model=MODEL, prompt="Hello", max_tokens=40, stop=[stop, "zzzz"])
    assert short.choices[0].text == expected and short.choices[0].finish_reason == "stop"
    text, finish, _ = _stream_text(
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=40, stop=stop, stream=True)
    )
    assert (text, finish) == (expected, "stop")


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=0
    )
    assert len(chat.choices[0].logprobs.content) == 5
    comp = client.completions.create(model=MODEL, prompt="x", max_tokens=5, logprobs=1)
    assert len(comp.choices[0].logprobs.token_logprobs) == 5
    assert len(comp.choices[0].logprobs.tokens) == 5


async def test_concurrent_requests(sim_server: ThreadedServer) -> None:
    client = openai.AsyncOpenAI(base_url=sim_server.url + "/v1", api_key="none", max_retries=0)

    async def one(i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"request number {i}"}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            usage = chunk.usage or usage
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text, usage.completion_tokens

    results = await asyncio.gather(*(one(i) for i in range(24)))
    assert all(n == 20 for _, n in results)
    await client.close()


def test_models_health_live_metrics_openapi(sim_server: ThreadedServer, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(sim_server.url + "/health").status_code == 200
    assert httpx.get(sim_server.url + "/live").status_code == 200
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    metrics = httpx.get(sim_server.url + "/metrics").text
    assert 'tandem_frontend_requests_total{endpoint="chat",status="200"}' in metrics
    for name in (
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "output_tokens_total",
    ):
        assert f"tandem_frontend_{name}" in metrics
    spec = httpx.get(sim_server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        ({"model": MODEL}, "messages"),
        ({**chat_body, "max_tokens": "ten"}, "max_tokens"),
        ({**chat_body, "temperature": -1}, "temperature"),
        ({**chat_body, "temperature": 2.1}, "temperature"),
        ({**chat_body, "top_p": 0}, "top_p"),
        ({**chat_body, "top_p": 1.1}, "top_p"),
        ({**chat_body, "max_tokens": -5}, "max_tokens"),
        ({**chat_body, "n": 2}, "n"),
        ({**chat_body, "response_format": {"type": "json_object"}}, "response_format"),
        ({**chat_body, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_invalid_requests_are_400(sim_server: ThreadedServer, body: Any, param: str | None) -> None:
    err = expect_error(post_json(sim_server, "/v1/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_unknown_model_and_route_are_404(sim_server: ThreadedServer) -> None:
    err = expect_error(post_json(sim_server, "/v1/chat/completions", {**chat_body, "model": "nope"}), 404)
    assert err["code"] == "model_not_found"
    expect_error(httpx.get(sim_server.url + "/v1/nothing"), 404)


def test_prompt_longer_than_context_is_400(sim_server: ThreadedServer) -> None:
    err = expect_error(
        post_json(sim_server, "/v1/completions", {"model": MODEL, "prompt": list(range(3, 303))}), 400
    )
    assert "300" in err["message"] and "256" in err["message"]


def test_a_request_body_past_the_limit_is_413_before_it_is_read(tiny_dir: Path) -> None:
    limit = 4096
    config = EngineConfig(max_model_len=256)
    with sim_frontend(tiny_dir, speedup=1000, config=config, name=MODEL, max_request_bytes=limit) as server:
        big = {**chat_body, "messages": [{"role": "user", "content": "x" * limit}]}
        resp = post_json(server, "/v1/chat/completions", big)
        err = expect_error(resp, 413)
        assert err["code"] == "request_too_large" and str(limit) in err["message"]
        assert resp.headers["connection"] == "close"  # the unread rest of the upload is not parsed

        # A chunked upload (no Content-Length) is cut off as its pieces pass the limit.
        def pieces() -> Iterator[bytes]:
            yield json.dumps(big).encode()[:3000]
            yield json.dumps(big).encode()[3000:]

        resp = httpx.post(server.url + "/v1/chat/completions", content=pieces())
        assert "content-length" not in resp.request.headers
        assert expect_error(resp, 413)["code"] == "request_too_large"

        # Under the limit, in pieces or not, the request is served.
        small = json.dumps({**chat_body, "max_tokens": 3}).encode()
        assert post_json(server, "/v1/chat/completions", small).status_code == 200
        resp = httpx.post(server.url + "/v1/chat/completions", content=iter([small[:10], small[10:]]))
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(server.url + "/metrics").text
        assert 'status="413"' in metrics


def test_max_tokens_past_context_is_clamped(sim_server: ThreadedServer) -> None:
    resp = post_json(
        sim_server, "/v1/completions", {"model": MODEL, "prompt": list(range(3, 203)), "max_tokens": 1000}
    )
    body = resp.json()
    assert resp.status_code == 200
    assert body["usage"]["completion_tokens"] == 56 and body["choices"][0]["finish_reason"] == "length"


def test_builtin_engine_greedy_matches_engine_core(tiny_dir: Path) -> None:
    from tandem.engines.builtin.executor import BuiltinExecutor

    config = EngineConfig()
    backend = LocalBackend.build(tiny_dir, engine="builtin", name=MODEL, config=config, dtype="float32")
    server = ThreadedServer(create_app(backend))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        via_http = client.completions.create(
            model=MODEL,
            prompt=[1, 50, 60, 70, 80],
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    finally:
        server.stop()
        backend.close()
    core = EngineCore(config, BuiltinExecutor(tiny_dir, config, dtype="float32"))
    core.add_request([1, 50, 60, 70, 80], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ids: list[int] = []
    while core.has_unfinished():
        for out in core.step():
            ids.extend(out.new_token_ids)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert via_http.usage.completion_tokens == len(ids) == 12
    assert via_http.choices[0].text == tok.decode(ids, skip_special_tokens=True)

"""The OpenAI frontend over a real uvicorn server on 127.0.0.1, driven by the official `openai` client
(happy paths) and httpx (error paths), over LocalBackend with the simulated engine, plus backend doubles
for failures a real engine cannot be made to show on demand."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
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
from tandem.protocol.errors import WorkerLostError
from tandem.protocol.messages import EngineOutput, GenerateRequest, acceptance
from tandem.router.interface import ModelCard
from tests.integration.servers import ThreadedServer

MODEL = "tiny"
CHAT = [{"role": "user", "content": "What is the capital of France? Tell me about Paris."}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sim_server(tiny_dir: Path) -> Iterator[ThreadedServer]:
    backend = LocalBackend.build(
        tiny_dir, engine="sim", name=MODEL, speedup=1000, config=EngineConfig(max_model_len=256)
    )
    server = ThreadedServer(create_app(backend))
    yield server
    server.stop()
    backend.close()


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


def _post(server: ThreadedServer, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kw)


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


BASE = {"model": MODEL, "messages": CHAT}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        ({"model": MODEL}, "messages"),
        ({**BASE, "max_tokens": "ten"}, "max_tokens"),
        ({**BASE, "temperature": -1}, "temperature"),
        ({**BASE, "temperature": 2.1}, "temperature"),
        ({**BASE, "top_p": 0}, "top_p"),
        ({**BASE, "top_p": 1.1}, "top_p"),
        ({**BASE, "max_tokens": -5}, "max_tokens"),
        ({**BASE, "n": 2}, "n"),
        ({**BASE, "response_format": {"type": "json_object"}}, "response_format"),
        ({**BASE, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_invalid_requests_are_400(sim_server: ThreadedServer, body: Any, param: str | None) -> None:
    err = _error(_post(sim_server, "/v1/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_unknown_model_and_route_are_404(sim_server: ThreadedServer) -> None:
    err = _error(_post(sim_server, "/v1/chat/completions", {**BASE, "model": "nope"}), 404)
    assert err["code"] == "model_not_found"
    _error(httpx.get(sim_server.url + "/v1/nothing"), 404)


def test_prompt_longer_than_context_is_400(sim_server: ThreadedServer) -> None:
    err = _error(_post(sim_server, "/v1/completions", {"model": MODEL, "prompt": list(range(3, 303))}), 400)
    assert "300" in err["message"] and "256" in err["message"]


def test_max_tokens_past_context_is_clamped(sim_server: ThreadedServer) -> None:
    resp = _post(
        sim_server, "/v1/completions", {"model": MODEL, "prompt": list(range(3, 203)), "max_tokens": 1000}
    )
    body = resp.json()
    assert resp.status_code == 200
    assert body["usage"]["completion_tokens"] == 56 and body["choices"][0]["finish_reason"] == "length"


class FakeBackend:
    """A scripted backend: `script(req)` gives the stream; records whether each stream was closed."""

    def __init__(self, model_dir: Path, script: Any, ready: bool = True) -> None:
        self.card = ModelCard(name=MODEL, model_dir=str(model_dir), max_model_len=256)
        self.script = script
        self.ready = ready
        self.closed = asyncio.Event()
        self.closed_flag = False

    def models(self) -> list[ModelCard]:
        return [self.card]

    def is_ready(self, model: str) -> bool:
        return self.ready

    async def generate(self, req: GenerateRequest) -> AsyncIterator[EngineOutput]:
        try:
            async for out in self.script(req):
                yield out
        finally:
            self.closed_flag = True


@pytest.fixture
def fake_server(
    tiny_dir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ThreadedServer, FakeBackend]]:
    backend = FakeBackend(tiny_dir, *request.param)
    server = ThreadedServer(create_app(backend))
    yield server, backend
    server.stop()


async def _one_then_lost(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    yield EngineOutput(req.request_id, [300], num_prompt_tokens=5)
    await asyncio.sleep(0.05)
    raise WorkerLostError("worker w1 died")


async def _one_then_forever(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    yield EngineOutput(req.request_id, [300], num_prompt_tokens=5)
    await asyncio.Event().wait()


async def _forever(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    await asyncio.Event().wait()
    yield EngineOutput(req.request_id, [300])


@pytest.mark.parametrize("fake_server", [(_one_then_lost,)], indirect=True)
def test_worker_lost_mid_stream_sends_error_event(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, backend = fake_server
    t0 = time.monotonic()
    resp = _post(server, "/v1/chat/completions", {**BASE, "stream": True}, timeout=5)
    assert resp.status_code == 200 and time.monotonic() - t0 < 3
    events = [line[6:] for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "worker_lost"
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert backend.closed_flag


@pytest.mark.parametrize("fake_server", [(_one_then_lost,)], indirect=True)
def test_worker_lost_non_streaming_is_502(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, _ = fake_server
    _error(_post(server, "/v1/chat/completions", BASE, timeout=5), 502)


@pytest.mark.parametrize("fake_server", [(_one_then_lost, False)], indirect=True)
def test_no_live_worker_is_503_with_retry_after(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, _ = fake_server
    resp = _post(server, "/v1/chat/completions", BASE)
    _error(resp, 503)
    assert resp.headers["retry-after"] == "1"
    assert httpx.get(server.url + "/health").status_code == 503
    assert httpx.get(server.url + "/live").status_code == 200


@pytest.mark.parametrize("fake_server", [(_one_then_forever,), (_forever,)], indirect=True)
def test_client_disconnect_closes_the_backend_stream(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, backend = fake_server
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json={**BASE, "stream": True}) as resp:
            for _ in resp.iter_bytes():
                pass
    deadline = time.monotonic() + 3
    while not backend.closed_flag and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.closed_flag, "the backend stream was not closed after the client left"
    assert httpx.get(server.url + "/live").status_code == 200


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


async def _merged_outputs(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    # What a lagging request plane delivers: several steps' tokens merged into one output.
    yield EngineOutput(req.request_id, [300, 301, 302], num_prompt_tokens=5)
    yield EngineOutput(req.request_id, [303, 304], finish_reason="length", num_prompt_tokens=5)


@pytest.mark.parametrize("fake_server", [(_merged_outputs,)], indirect=True)
def test_merged_outputs_stream_one_event_per_token(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, _ = fake_server
    body = {**BASE, "stream": True, "stream_options": {"include_usage": True}}
    resp = _post(server, "/v1/chat/completions", body, timeout=5)
    events = [line[6:] for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    chunks = [json.loads(e)["choices"][0] for e in events[:-2]]
    assert len(chunks) == 5 == usage["completion_tokens"]
    assert chunks[0]["delta"]["role"] == "assistant"
    assert all("role" not in c["delta"] for c in chunks[1:])
    assert [c["finish_reason"] for c in chunks] == [None, None, None, None, "length"]


_release = threading.Event()


async def _accepted_then_held(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    # A worker took the request; its tokens come only once the test has read the headers.
    yield acceptance(req.request_id)
    while not _release.is_set():
        await asyncio.sleep(0.005)
    yield EngineOutput(req.request_id, [300], num_prompt_tokens=5)
    yield EngineOutput(req.request_id, [301], finish_reason="length", num_prompt_tokens=5)


@pytest.mark.parametrize("fake_server", [(_accepted_then_held,)], indirect=True)
def test_the_stream_opens_when_a_worker_accepts_before_its_first_token(
    fake_server: tuple[ThreadedServer, FakeBackend],
) -> None:
    server, _ = fake_server
    _release.clear()
    with httpx.Client(timeout=5) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json={**BASE, "stream": True}) as resp:
            # Status and headers are here while the backend still holds every token.
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            _release.set()
            text = resp.read().decode()
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert len(chunks) == 2 and chunks[0]["delta"]["role"] == "assistant"  # the acceptance adds no event
    assert [c["finish_reason"] for c in chunks] == [None, "length"]
    body = _post(server, "/v1/chat/completions", BASE, timeout=5).json()
    assert body["usage"]["completion_tokens"] == 2 and body["choices"][0]["finish_reason"] == "length"


def _crash(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    raise RuntimeError("backend bug")


@pytest.mark.parametrize("fake_server", [(_crash,)], indirect=True)
def test_backend_crash_is_a_500_in_openai_shape(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    # The generation routes bypass FastAPI's exception handlers; a crash must still be a clean 500.
    server, _ = fake_server
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = BASE if "chat" in path else {"model": MODEL, "prompt": "hi"}
        resp = _post(server, path, body, timeout=5)
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405

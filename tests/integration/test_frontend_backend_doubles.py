"""The OpenAI frontend over scripted backends (a real uvicorn server on 127.0.0.1, httpx as the client):
failures, disconnects and stream shapes that a real engine cannot be made to show on demand."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandem.frontend.app import create_app
from tandem.models.tiny import write_tiny_model
from tandem.protocol.errors import WorkerLostError
from tandem.protocol.messages import EngineOutput, GenerateRequest, acceptance
from tandem.router.interface import ModelCard
from tests.integration.servers import MODEL, ThreadedServer, chat_body, expect_error, post_json


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


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
    resp = post_json(server, "/v1/chat/completions", {**chat_body, "stream": True}, timeout=5)
    assert resp.status_code == 200 and time.monotonic() - t0 < 3
    events = [line[6:] for line in resp.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "worker_lost"
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert backend.closed_flag


@pytest.mark.parametrize("fake_server", [(_one_then_lost,)], indirect=True)
def test_worker_lost_non_streaming_is_502(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, _ = fake_server
    expect_error(post_json(server, "/v1/chat/completions", chat_body, timeout=5), 502)


@pytest.mark.parametrize("fake_server", [(_one_then_lost, False)], indirect=True)
def test_no_live_worker_is_503_with_retry_after(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, _ = fake_server
    resp = post_json(server, "/v1/chat/completions", chat_body)
    expect_error(resp, 503)
    assert resp.headers["retry-after"] == "1"
    assert httpx.get(server.url + "/health").status_code == 503
    assert httpx.get(server.url + "/live").status_code == 200


@pytest.mark.parametrize("fake_server", [(_one_then_forever,), (_forever,)], indirect=True)
def test_client_disconnect_closes_the_backend_stream(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, backend = fake_server
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as http:
        with http.stream(
            "POST", server.url + "/v1/chat/completions", json={**chat_body, "stream": True}
        ) as resp:
            for _ in resp.iter_bytes():
                pass
    deadline = time.monotonic() + 3
    while not backend.closed_flag and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.closed_flag, "the backend stream was not closed after the client left"
    assert httpx.get(server.url + "/live").status_code == 200


async def _merged_outputs(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    # What a lagging request plane delivers: several steps' tokens merged into one output.
    yield EngineOutput(req.request_id, [300, 301, 302], num_prompt_tokens=5)
    yield EngineOutput(req.request_id, [303, 304], finish_reason="length", num_prompt_tokens=5)


@pytest.mark.parametrize("fake_server", [(_merged_outputs,)], indirect=True)
def test_merged_outputs_stream_one_event_per_token(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    server, _ = fake_server
    body = {**chat_body, "stream": True, "stream_options": {"include_usage": True}}
    resp = post_json(server, "/v1/chat/completions", body, timeout=5)
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
        with http.stream(
            "POST", server.url + "/v1/chat/completions", json={**chat_body, "stream": True}
        ) as resp:
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
    body = post_json(server, "/v1/chat/completions", chat_body, timeout=5).json()
    assert body["usage"]["completion_tokens"] == 2 and body["choices"][0]["finish_reason"] == "length"


def _crash(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    raise RuntimeError("backend bug")


@pytest.mark.parametrize("fake_server", [(_crash,)], indirect=True)
def test_backend_crash_is_a_500_in_openai_shape(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    # The generation routes bypass FastAPI's exception handlers; a crash must still be a clean 500.
    server, _ = fake_server
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = chat_body if "chat" in path else {"model": MODEL, "prompt": "hi"}
        resp = post_json(server, path, body, timeout=5)
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


class AnnouncingBackend(FakeBackend):
    """A backend that picks early (`RouterBackend.announce`): records announcements and withdrawals."""

    def __init__(self, model_dir: Path, script: Any) -> None:
        super().__init__(model_dir, script)
        self.announced: list[str] = []
        self.withdrawn: list[str] = []
        self.generated: list[str] = []

    def announce(self, model: str, request_id: str) -> None:
        assert model == MODEL
        self.announced.append(request_id)

    def withdraw(self, request_id: str) -> None:
        self.withdrawn.append(request_id)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[EngineOutput]:
        self.generated.append(req.request_id)
        async for out in super().generate(req):
            yield out


async def _two_tokens(req: GenerateRequest) -> AsyncIterator[EngineOutput]:
    yield EngineOutput(req.request_id, [300], num_prompt_tokens=5)
    yield EngineOutput(req.request_id, [301], finish_reason="length")


def test_an_early_pick_is_announced_before_tokenizing_and_released_whatever_happens(tiny_dir: Path) -> None:
    backend = AnnouncingBackend(tiny_dir, _two_tokens)
    server = ThreadedServer(create_app(backend))
    try:
        # Served: the announced id is the request the backend generates; the release at the end
        # (a no-op for a pick that `generate` took up) comes once.
        resp = post_json(server, "/v1/chat/completions", chat_body, timeout=5)
        assert resp.status_code == 200
        assert backend.announced == backend.generated == backend.withdrawn == [resp.json()["id"]]
        # Refused after the pick (the prompt is longer than the context): withdrawn, never generated.
        long = {**chat_body, "messages": [{"role": "user", "content": "Paris " * 400}]}
        expect_error(post_json(server, "/v1/chat/completions", long, timeout=5), 400)
        assert len(backend.announced) == 2 and backend.withdrawn == backend.announced
        assert len(backend.generated) == 1
        # Refused before the pick (unknown model): nothing announced.
        expect_error(post_json(server, "/v1/chat/completions", {**chat_body, "model": "nope"}), 404)
        assert len(backend.announced) == 2
        # The client leaves before any output: the pick is released.
        backend.script = _forever
        with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as http:
            http.post(server.url + "/v1/chat/completions", json={**chat_body, "stream": True})
        deadline = time.monotonic() + 3
        while len(backend.withdrawn) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.withdrawn == backend.announced and len(backend.announced) == 3
    finally:
        server.stop()


@pytest.mark.parametrize("fake_server", [(_two_tokens,)], indirect=True)
def test_a_lone_surrogate_in_a_prompt_is_a_400(fake_server: tuple[ThreadedServer, FakeBackend]) -> None:
    # Valid JSON ("\\ud800" is a legal escape) whose text no tokenizer takes: the client's error.
    server, backend = fake_server
    for path, field in (
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "a\\ud800b"}]'),
        ("/v1/completions", '"prompt": "a\\ud800b"'),
    ):
        body = f'{{"model": "{MODEL}", {field}, "max_tokens": 2}}'.encode()
        resp = httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}, timeout=5
        )
        expect_error(resp, 400)
        assert "surrogate" in resp.json()["error"]["message"]
    assert not backend.closed_flag  # nothing reached the backend

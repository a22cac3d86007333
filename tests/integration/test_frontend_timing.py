"""Per-request timing in responses (`nvext.extra_fields: ["timing"]`, as NVIDIA Dynamo reports it),
over a real uvicorn server on 127.0.0.1 with the simulated engine at real speed (speed-up 1), so the
prefill step the server reports can be checked against the engine's timing model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tandem.engine.config import EngineConfig
from tandem.models.tiny import write_tiny_model
from tests.integration.servers import CHAT, MODEL, ThreadedServer, sim_frontend

TIMING_FIELDS = {"request_received_ms", "prefill_wait_time_ms", "prefill_time_ms", "ttft_ms", "total_time_ms"}
NVEXT = {"nvext": {"extra_fields": ["worker_id", "timing"]}}
PREFILL_MS = 16.5
"""The simulated engine's fixed cost of a prefill step (its timing model's constant), at speed-up 1."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    tiny_dir: Path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    with sim_frontend(tiny_dir, speedup=1, config=EngineConfig(max_model_len=256), name=MODEL) as server:
        yield server


def _check(timing: dict[str, float], before_ms: float, after_ms: float, tokens: int) -> None:
    assert set(timing) == TIMING_FIELDS | {"engine_ttft_ms"}
    # Tandem's extra: the engine's own share of the time from dispatch to the first token.
    assert PREFILL_MS <= timing["engine_ttft_ms"] <= timing["prefill_time_ms"]
    assert before_ms - 1 <= timing["request_received_ms"] <= after_ms + 1
    assert timing["prefill_wait_time_ms"] >= 0
    assert timing["prefill_time_ms"] >= PREFILL_MS  # the engine's prefill step is in it
    assert timing["ttft_ms"] == pytest.approx(timing["prefill_wait_time_ms"] + timing["prefill_time_ms"])
    # Every later token is at least one decode step (5.7 ms at this load) after the one before.
    assert timing["total_time_ms"] >= timing["ttft_ms"] + (tokens - 1) * 5.0
    assert timing["total_time_ms"] <= after_ms - timing["request_received_ms"] + 1


def test_streamed_timing_comes_with_the_finish_chunk(server: ThreadedServer) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True, **NVEXT}
    body["stream_options"] = {"include_usage": True}
    before = time.time() * 1000
    sent = time.perf_counter()
    first_token = 0.0
    events: list[dict] = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if not first_token and events[-1]["choices"]:
                    first_token = time.perf_counter()
    after = time.time() * 1000
    with_nvext = [e for e in events if "nvext" in e]
    assert len(with_nvext) == 1, "one chunk carries the timing"
    (finish,) = with_nvext
    assert finish["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 4  # the usage chunk still follows
    timing = finish["nvext"]["timing"]
    _check(timing, before, after, tokens=4)
    assert timing["ttft_ms"] <= (first_token - sent) * 1000  # the client waited at least as long


def test_non_streaming_timing_via_the_openai_client(server: ThreadedServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    before = time.time() * 1000
    full = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=3, extra_body=NVEXT)
    after = time.time() * 1000
    assert full.usage is not None and full.usage.completion_tokens == 3
    assert full.model_extra is not None
    _check(full.model_extra["nvext"]["timing"], before, after, tokens=3)


def test_no_nvext_unless_asked(server: ThreadedServer) -> None:
    """Clients that do not ask see the OpenAI shapes unchanged; an nvext without "timing" adds nothing."""
    for extra in ({}, {"nvext": {"extra_fields": ["worker_id"]}}, {"nvext": {"agent_hints": {"osl": 4}}}):
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra}
        resp = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert resp.status_code == 200 and "nvext" not in resp.json()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert all("nvext" not in line for line in r.iter_lines())


def test_malformed_nvext_is_400(server: ThreadedServer) -> None:
    body = {"model": MODEL, "messages": CHAT, "nvext": {"extra_fields": "timing"}}
    resp = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "nvext.extra_fields"

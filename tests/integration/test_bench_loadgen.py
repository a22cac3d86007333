"""`tandem bench` against a real HTTP server on 127.0.0.1 (uvicorn + the simulated engine in-process):
closed loop with token-id prompts, open loop, chat text prompts, and a small Mooncake trace."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.cli.main import main
from tandem.engine.config import EngineConfig
from tandem.models.tiny import write_tiny_model
from tests.integration.servers import sim_frontend


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def url(tiny_dir: Path) -> Iterator[str]:
    # speed-up 50: ~0.1 ms decode steps, so ITL is measurable and a run takes well under a second.
    with sim_frontend(tiny_dir, speedup=50, config=EngineConfig(block_size=16, max_model_len=1024)) as server:
        yield server.url


def _bench(tmp_path: Path, url: str, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    code = main(["bench", "--url", url, "--model", "tiny", "--out", str(out), *args])
    assert code == 0
    return json.loads(out.read_text())


def _sane(rep: dict[str, Any], n: int, osl: int | None) -> None:
    assert rep["requests"] == rep["completed"] == n and rep["errors"] == 0
    if osl is not None:
        assert rep["output_tokens_mean"] == osl and rep["chunks_per_request_mean"] == osl
    assert rep["duration_s"] > 0 and rep["req_per_s"] > 0 and rep["output_tok_per_s"] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        d = rep[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], (key, d)
    assert rep["ttft_ms"]["p50"] < rep["e2e_ms"]["p50"]
    assert rep["goodput_fraction"] == 1.0 and rep["slo_met"]  # 2 s / 50 ms are far above the sim's times


def test_closed_loop_token_prompts(tmp_path: Path, url: str, tiny_dir: Path) -> None:
    rep = _bench(
        tmp_path, url, "--tokenizer", str(tiny_dir), "--concurrency", "4", "--requests", "40",
        "--warmup", "4", "--isl", "32", "--osl", "8",
    )  # fmt: skip
    _sane(rep, 40, 8)
    assert rep["prompt_tokens_mean"] == 32
    assert rep["config"]["concurrency"] == 4
    assert rep["engine"] is None  # an in-process engine exports no worker series to split TTFT by
    assert rep["server"] is None  # not asked for


def test_open_loop_poisson(tmp_path: Path, url: str, tiny_dir: Path) -> None:
    rep = _bench(
        tmp_path, url, "--tokenizer", str(tiny_dir), "--rate", "100", "--requests", "30",
        "--isl", "16", "--osl", "4",
    )  # fmt: skip
    _sane(rep, 30, 4)
    # 30 arrivals at 100/s take about 0.3 s; far more means the generator did not pace them.
    assert 0.05 < rep["duration_s"] < 5


def test_chat_text_prompts(tmp_path: Path, url: str, tiny_dir: Path) -> None:
    rep = _bench(
        tmp_path, url, "--chat", "--tokenizer", str(tiny_dir), "--concurrency", "2",
        "--requests", "10", "--isl", "24", "--osl", "6",
    )  # fmt: skip
    _sane(rep, 10, 6)
    assert rep["prompt_tokens_mean"] > 24  # the chat template adds its own tokens


def test_server_timing_splits_ttft(tmp_path: Path, url: str, tiny_dir: Path) -> None:
    rep = _bench(
        tmp_path, url, "--chat", "--tokenizer", str(tiny_dir), "--concurrency", "2",
        "--requests", "10", "--isl", "24", "--osl", "6", "--server-timing",
    )  # fmt: skip
    _sane(rep, 10, 6)
    assert rep["prompt_tokens_mean"] > 24  # the timing rides on the finish chunk, usage still follows
    split = rep["server"]
    assert split["requests"] == 10
    # The server's TTFT is inside the client's, and the two parts it names make it up.
    assert 0 < split["ttft_ms"]["mean"] < rep["ttft_ms"]["mean"]
    assert split["outside_ms"]["p50"] > 0
    # The way in is part of the outside time (the server's whole milliseconds: up to 1 ms short).
    assert -1.0 <= split["way_in_ms"]["p50"] <= split["outside_ms"]["p50"] + 1.0
    # Tandem's servers also say what their engine took of the way to the first token.
    assert 0 < split["engine_ms"]["mean"] <= split["dispatch_to_first_ms"]["mean"]
    parts = split["intake_ms"]["mean"] + split["dispatch_to_first_ms"]["mean"]
    assert parts == pytest.approx(split["ttft_ms"]["mean"], abs=0.01)


def test_mooncake_trace_replay(tmp_path: Path, url: str, tiny_dir: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1000, "output_length": 40, "hash_ids": [1, 2]},
        {"timestamp": 100, "input_length": 1024, "output_length": 20, "hash_ids": [1, 2]},
        {"timestamp": 200, "input_length": 600, "output_length": 16, "hash_ids": [3, 4]},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rep = _bench(
        tmp_path, url, "--tokenizer", str(tiny_dir), "--trace", str(trace), "--time-scale", "10",
        "--length-divisor", "4",
    )  # fmt: skip
    _sane(rep, 3, None)
    assert rep["prompt_tokens_mean"] == pytest.approx((250 + 256 + 150) / 3, abs=0.1)
    assert rep["output_tokens_mean"] == pytest.approx((10 + 5 + 4) / 3, abs=0.01)

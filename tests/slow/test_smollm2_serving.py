"""End to end on SmolLM2-135M-Instruct: `tandem serve` disaggregated (1 prefill + 1 decode worker),
the official `openai` client, real text; greedy output through the server equals `tandem generate`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.servers import free_port

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "tandem.cli.main", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path):
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", str(smollm2_dir), "--port", str(port), "--prefill-workers", "1",
         "--decode-workers", "1", "--disagg-min-prompt-tokens", "8", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "Tandem ready" in line:
            break
        assert proc.poll() is None, "tandem serve exited during start-up"
    else:
        raise AssertionError("tandem serve did not become ready")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    yield f"http://127.0.0.1:{port}/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0


def test_chat_answers_with_real_text(server: str) -> None:
    client = OpenAI(base_url=server, api_key="none")
    r = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0,
    )
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.prompt_tokens > 8  # went through remote prefill
    chunks = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content


def test_greedy_completion_equals_tandem_generate(server: str, smollm2_dir: Path) -> None:
    prompt = "The history of the printing press begins"
    out = subprocess.run(
        [*CLI, "generate", "--model", str(smollm2_dir), "--prompt", prompt, "--max-tokens", "24",
         "--dtype", "float32", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    offline = json.loads(out.stdout)
    client = OpenAI(base_url=server, api_key="none")
    r = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == offline["text"]
    assert r.usage is not None and r.usage.completion_tokens == len(offline["token_ids"])

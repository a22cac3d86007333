"""Helpers for tests that run real servers on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    """A port the OS just reported free on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """uvicorn serving `app` in a background thread on a free port; `url` is its base URL."""

    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def sim_frontend(
    model_dir: Path, *, speedup: float, config: Any, name: str = "tiny", max_request_bytes: int | None = None
) -> Iterator[ThreadedServer]:
    """The OpenAI frontend over an in-process simulated engine (`LocalBackend`) on a free port;
    the server and the engine stop when the block ends."""
    from tandem.frontend.app import create_app
    from tandem.frontend.local import LocalBackend

    backend = LocalBackend.build(model_dir, engine="sim", name=name, speedup=speedup, config=config)
    server = ThreadedServer(create_app(backend, max_request_bytes=max_request_bytes))
    try:
        yield server
    finally:
        server.stop()
        backend.close()


MODEL = "tiny"
"""The served name of the tiny model in the frontend tests."""
CHAT = [{"role": "user", "content": "What is the capital of France? Tell me about Paris."}]
chat_body: dict[str, Any] = {"model": MODEL, "messages": CHAT}
"""A minimal chat request; spread it into a new dict to add fields."""


def post_json(server: ThreadedServer, path: str, body: Any, **kw: Any) -> httpx.Response:
    """POST `body` (bytes as they are, anything else as JSON) to `server`."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kw)


def expect_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error object of `resp`, which must have `status`."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err

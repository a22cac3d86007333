"""`read_body`: the request body from ASGI messages, bounded, and a client that leaves mid-upload."""

from __future__ import annotations

from typing import Any

import pytest

from tandem.frontend.app import read_body
from tandem.protocol.errors import RequestCancelledError, RequestTooLargeError


def _receive(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


def _scope(length: int | None = None) -> dict[str, Any]:
    headers = [(b"host", b"x")] + ([(b"content-length", str(length).encode())] if length is not None else [])
    return {"headers": headers}


def _part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_in_one_or_several_messages() -> None:
    assert await read_body(_scope(5), _receive(_part(b"hello", False)), 5) == b"hello"
    parts = _receive(_part(b"he", True), _part(b"", True), _part(b"llo", False))
    assert await read_body(_scope(), parts, 5) == b"hello"


async def test_past_the_limit_by_content_length_nothing_is_read() -> None:
    async def never() -> dict[str, Any]:
        raise AssertionError("the body was read")

    with pytest.raises(RequestTooLargeError, match="4 bytes"):
        await read_body(_scope(5), never, 4)


async def test_past_the_limit_while_reading_pieces() -> None:
    parts = _receive(_part(b"abc", True), _part(b"de", True), _part(b"f", False))
    with pytest.raises(RequestTooLargeError):
        await read_body(_scope(), parts, 4)


async def test_a_client_that_leaves_mid_upload_is_a_cancelled_request() -> None:
    parts = _receive(_part(b"abc", True), {"type": "http.disconnect"})
    with pytest.raises(RequestCancelledError):
        await read_body(_scope(), parts, 100)

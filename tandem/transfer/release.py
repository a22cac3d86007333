"""Freeing a prefill worker's KV hold from outside, without tensors (the router uses it)."""

from __future__ import annotations

import asyncio

from tandem.transfer.wire import Release, pack


async def release_hold(address: str, handle: str, timeout_s: float = 2.0) -> bool:
    """Ask a block server to free a hold unread. False if the server could not be reached (a dead
    server holds nothing; an unreachable one frees the hold at its own timeout)."""
    host, port = address.rsplit(":", 1)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(pack(Release(handle)))
        await asyncio.wait_for(writer.drain(), timeout_s)
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()

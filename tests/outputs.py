"""Reading backend and worker streams in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tandem.protocol.messages import EngineOutput


async def next_output(stream: AsyncIterator[EngineOutput]) -> EngineOutput:
    """The stream's next output with a token or a finish, past a worker's acceptance (`acceptance`)."""
    while True:
        out = await anext(stream)
        if not out.is_acceptance:
            return out

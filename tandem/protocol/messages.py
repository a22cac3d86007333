"""Typed messages that cross process seams. One codec for all of them: msgpack via msgspec."""

from __future__ import annotations

from typing import Any

import msgspec


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one engine step produced for one request: the tokens new since the last output.

    `finish_reason` is set on the last output of a request ("stop", "length" or "abort").
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    new_logprobs: list[float] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    stop_reason: int | None = None
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

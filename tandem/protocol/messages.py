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
    engine_ttft_s: float = 0.0
    """Set on a request's first token: the engine's own time from taking the request in to emitting
    it (its queue and prefill, on the engine's clock), for the frontend's per-request timing."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_acceptance(self) -> bool:
        """No tokens and no finish: the first output of a worker's stream, sent once its engine has
        taken the request in (`acceptance`). Every other output carries a token or a finish reason."""
        return not self.new_token_ids and self.finish_reason is None


def acceptance(request_id: str) -> EngineOutput:
    """The output a worker streams first, once its engine has taken the request in: it lets the
    frontend answer 200 and open the SSE stream while the prefill runs (as Dynamo's frontend does
    once its request plane confirms the stream), so the first token goes out alone and the client
    has read the headers by then. Errors before it (the engine refused the request, no worker took
    it) still get their own HTTP status."""
    return EngineOutput(request_id, [])


class SamplingSpec(msgspec.Struct, omit_defaults=True):
    """Wire form of `tandem.engine.request.SamplingParams` (same fields, same defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    min_tokens: int = 0


class GenerateRequest(msgspec.Struct, omit_defaults=True):
    """Frontend/router -> worker: generate tokens for a tokenized prompt."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    kv_transfer_params: dict[str, Any] | None = None
    """Disaggregation: on a prefill request, ask the worker to keep the KV for a peer; on a decode
    request, where to fetch the prompt's KV from."""
    annotations: dict[str, str] | None = None
    output_token_ids: list[int] = msgspec.field(default_factory=list)
    """Tokens already generated for this request elsewhere (a prefill worker's first token, or a
    failed worker's tokens so far): generation continues after them; they are not emitted again."""

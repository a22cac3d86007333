"""Per-request timing in the response, as NVIDIA Dynamo reports it (`nvext.extra_fields: ["timing"]`).

A client that sends `"nvext": {"extra_fields": ["timing"]}` gets, in the non-streaming response and in
the streamed chunk that carries the finish reason:

    "nvext": {"timing": {"request_received_ms": 1796388000000,   # Unix epoch ms, as the frontend got it
                         "prefill_wait_time_ms": 0.6,   # receipt -> sent to a worker (parse, template,
                                                        #   tokenization, routing)
                         "prefill_time_ms": 18.9,       # sent -> first token back in the frontend
                         "ttft_ms": 19.5,               # receipt -> first token (the sum)
                         "total_time_ms": 305.2,        # receipt -> last token
                         "engine_ttft_ms": 17.9}}       # Tandem's: the engine's own share of
                                                        #   prefill_time_ms (its queue and prefill)

The first five are Dynamo's fields with Dynamo's meanings, so one client can split its own TTFT into
the part spent outside the server (HTTP, the client itself: its TTFT minus `ttft_ms`), the frontend's
intake, and the worker's share, for either system; they are on the frontend's clock. Tandem adds
`engine_ttft_ms` (when the engine reported it), on the engine's clock: from the engine taking the
request in (the wait for the step under way included) to its first token, so `prefill_time_ms` minus
it is the request plane's share, both ways. Other `extra_fields` values are ignored.
"""

from __future__ import annotations

import time

import msgspec

_encode = msgspec.json.Encoder().encode

TIMING = "timing"


class RequestTiming:
    """The instants one request passes in the frontend (`time.perf_counter()`)."""

    __slots__ = ("dispatched", "engine_ttft", "first", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.dispatched = started
        self.first = 0.0
        self.engine_ttft = 0.0
        """Seconds, from the first token's output (`EngineOutput.engine_ttft_s`); 0.0: not sent."""

    def first_token(self, now: float, engine_ttft_s: float) -> None:
        """The first token reached the frontend at `now`; the engine took `engine_ttft_s` of it."""
        self.first = now
        self.engine_ttft = engine_ttft_s

    def fields(self, now: float) -> dict[str, float | int]:
        """The `timing` object, the request ending at `now`."""
        ms = 1000.0
        first = self.first or now
        fields: dict[str, float | int] = {
            "request_received_ms": int((time.time() - (now - self.started)) * ms),
            "prefill_wait_time_ms": (self.dispatched - self.started) * ms,
            "prefill_time_ms": (first - self.dispatched) * ms,
            "ttft_ms": (first - self.started) * ms,
            "total_time_ms": (now - self.started) * ms,
        }
        if self.engine_ttft:
            fields["engine_ttft_ms"] = self.engine_ttft * ms
        return fields

    def nvext(self, now: float) -> dict[str, dict[str, float | int]]:
        return {TIMING: self.fields(now)}

    def nvext_bytes(self, now: float) -> bytes:
        return _encode(self.nvext(now))

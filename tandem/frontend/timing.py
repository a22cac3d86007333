"""Per-request timing in the response, as NVIDIA Dynamo reports it (`nvext.extra_fields: ["timing"]`).

A client that sends `"nvext": {"extra_fields": ["timing"]}` gets, in the non-streaming response and in
the streamed chunk that carries the finish reason:

    "nvext": {"timing": {"request_received_ms": 1796388000000,   # Unix epoch ms, as the frontend got it
                         "prefill_wait_time_ms": 0.6,   # receipt -> sent to a worker (parse, template,
                                                        #   tokenization, routing)
                         "prefill_time_ms": 18.9,       # sent -> first token back in the frontend
                         "ttft_ms": 19.5,               # receipt -> first token (the sum)
                         "total_time_ms": 305.2}}       # receipt -> last token

The same fields and meanings as Dynamo's frontend, so one client can split its own TTFT into the part
spent outside the server (HTTP, the client itself: its TTFT minus `ttft_ms`), the frontend's intake,
and the worker's share, for either system. Times are on the frontend's clock. Other `extra_fields`
values are ignored.
"""

from __future__ import annotations

import time

import msgspec

_encode = msgspec.json.Encoder().encode

TIMING = "timing"


class RequestTiming:
    """The instants one request passes in the frontend (`time.perf_counter()`)."""

    __slots__ = ("dispatched", "first", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.dispatched = started
        self.first = 0.0

    def fields(self, now: float) -> dict[str, float | int]:
        """The `timing` object, the request ending at `now`."""
        ms = 1000.0
        first = self.first or now
        return {
            "request_received_ms": int((time.time() - (now - self.started)) * ms),
            "prefill_wait_time_ms": (self.dispatched - self.started) * ms,
            "prefill_time_ms": (first - self.dispatched) * ms,
            "ttft_ms": (first - self.started) * ms,
            "total_time_ms": (now - self.started) * ms,
        }

    def nvext(self, now: float) -> dict[str, dict[str, float | int]]:
        return {TIMING: self.fields(now)}

    def nvext_bytes(self, now: float) -> bytes:
        return _encode(self.nvext(now))

"""A request inside one engine: its tokens, how many of them have KV computed, and its blocks.

The scheduler works by token counts alone (no prefill/decode phase flag):

    all_token_ids:  [ p0 p1 ... p(P-1) | o0 o1 ... ]      P prompt tokens, then generated ones
                     <-- num_computed_tokens -->|<- to compute this or later steps ->

A step schedules `n` new tokens of a request; after the step `num_computed_tokens += n`, and when it
then equals `num_tokens` the executor has sampled the next token. Chunked prefill, prefix hits (start
with num_computed_tokens > 0), KV loaded from another worker and recompute after preemption are all
just different starting points of the same count.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tandem.kvcache.hashing import extend_block_hashes


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_REMOTE_KV = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated at construction."""

    max_tokens: int = 16
    """Most tokens to generate (the engine also stops at its context length)."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Per-request random seed: the same seed and prompt give the same tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop after generating any of these (the stop token is returned)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    logprobs: bool = False
    """Return the log-probability of each chosen token."""
    min_tokens: int = 0
    """Do not stop on EOS or stop ids before this many tokens."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    kv_transfer_params: dict[str, Any] | None = None
    """Set by a disaggregation peer: where this request's first tokens' KV can be fetched, or a
    flag asking this engine to keep the KV for a peer to fetch. Read only by the KV connector."""

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens found in the local prefix cache or loaded from a peer at first schedule; -1
    until the request is first scheduled."""
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | None = None
    first_scheduled_time: float | None = None
    """When it was first scheduled (the engine's clock; `arrival_time` is on the same clock)."""
    last_token_time: float | None = None
    """When this engine last emitted a token for it (None before its first)."""

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"
        self.all_token_ids = list(self.prompt_token_ids)
        extend_block_hashes(self.block_hashes, self.all_token_ids, self.block_size)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASON.get(self.status)

    def append_output(self, token_id: int, logprob: float | None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if len(self.all_token_ids) % self.block_size == 0:
            extend_block_hashes(self.block_hashes, self.all_token_ids, self.block_size)

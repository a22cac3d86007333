"""What the scheduler asks of an executor, and what it gets back.

An executor runs one step: it computes KV for each scheduled request's new tokens and samples the
next token for every request whose known tokens are then all computed. The built-in executor does
this with tensors; the simulated one advances a clock by a timing model and makes up tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem.engine.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens whose KV this step computes, starting at position `start`."""
    start: int
    """`request.num_computed_tokens` when the step was scheduled (prefix hits and loads included)."""
    block_ids: list[int] = field(default_factory=list)
    """The request's KV blocks, covering at least positions [0, start + num_new_tokens). The
    scheduler passes the KV manager's live list: read it during the step, do not keep it."""

    @property
    def samples(self) -> bool:
        """Whether this step produces the request's next token."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    finished_request_ids: set[str] = field(default_factory=set)
    """Requests freed since the previous step: the executor drops any per-request state."""
    preempted_request_ids: set[str] = field(default_factory=set)
    connector_meta: Any = None
    kv_usage: float = 0.0
    """Used / total KV blocks after this step's allocations (timing models read it)."""

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass
class ExecutorOutput:
    sampled: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    """request id -> (token id, its logprob or None) for requests with `samples` True."""
    step_seconds: float = 0.0
    """Duration of the step as the executor measured (or modelled) it."""


class Executor(Protocol):
    num_blocks: int
    """KV blocks the executor holds tensors (or a budget) for."""
    max_model_len: int
    eos_token_ids: tuple[int, ...]

    def execute(self, out: SchedulerOutput) -> ExecutorOutput: ...

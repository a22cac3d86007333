"""KV connector seam: how KV computed elsewhere enters this engine, and how this engine's KV leaves.

Split like vLLM v1's connector, so disaggregation and KV tiers plug in without touching the scheduler:

* `KVConnectorScheduler` runs beside the scheduler and answers with counts and block ids only:
  how many of a request's first tokens can be loaded from outside, what to load into which blocks,
  and whether a finished request's blocks must outlive it (a peer still has to pull them).
* `KVConnectorWorker` runs beside the executor and moves bytes: it loads blocks before a step's
  forward pass and reports transfers that have finished.

The scheduler side hands the worker side one opaque metadata object per step, inside
`SchedulerOutput.connector_meta`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tandem.engine.request import Request


@dataclass
class ExternalMatch:
    """Answer of `get_num_new_matched_tokens`."""

    num_tokens: int = 0
    """Tokens after the local prefix hit whose KV the connector can supply."""
    load_async: bool = False
    """True: the load runs in the background and the request waits (`WAITING_FOR_REMOTE_KV`)
    until `KVConnectorWorker.get_finished` names it. False: it is loaded inside the next step."""


@dataclass
class FinishedTransfers:
    sending: set[str] = field(default_factory=set)
    """Requests whose held blocks a peer has finished reading: free them now."""
    receiving: set[str] = field(default_factory=set)
    """Requests whose asynchronous load is complete: schedule them."""
    failed: set[str] = field(default_factory=set)
    """Requests whose asynchronous load failed: the engine computes their prompt itself."""


class KVConnectorScheduler(ABC):
    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_local_tokens: int) -> ExternalMatch:
        """Tokens beyond `num_local_tokens` (already computed or prefix-cached) loadable from outside.

        Must leave at least one token of the request to compute (its logits pick the next token).
        """

    @abstractmethod
    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Blocks are allocated; remember which of them the external tokens load into."""

    @abstractmethod
    def build_meta(self) -> Any:
        """Metadata for the worker side for the step being scheduled (and reset internal state)."""

    @abstractmethod
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """A request is done. Returns (hold_blocks, kv_transfer_params for the client).

        With hold_blocks True the engine keeps the blocks until the worker side reports the request
        in `FinishedTransfers.sending`.
        """


class KVConnectorWorker(ABC):
    @abstractmethod
    def start_load_kv(self, meta: Any) -> None:
        """Begin (or, for synchronous loads, complete) loading this step's external KV."""

    @abstractmethod
    def save_kv(self, meta: Any) -> None:
        """After the forward pass: publish KV that peers will read."""

    @abstractmethod
    def get_finished(self) -> FinishedTransfers:
        """Transfers finished since the last call."""

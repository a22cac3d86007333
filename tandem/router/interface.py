"""The seam between the HTTP frontend and whatever serves tokens behind it.

The frontend tokenizes, then hands a `GenerateRequest` to a `Backend`: in a deployment that is the
router client (discovery + routing + request plane to worker processes); in tests and single-process
use it can be an in-process engine. Everything after tokenization and before detokenization lives
behind this interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from tandem.protocol.messages import EngineOutput, GenerateRequest


class ModelCard(msgspec.Struct, frozen=True):
    """A served model as the frontend needs it."""

    name: str
    model_dir: str
    """Local folder with the tokenizer and chat template (the same checkpoint the workers load)."""
    max_model_len: int
    created: int = 0


class Backend(Protocol):
    """Optional, looked up with getattr: `announce(model, request_id)`, called as the request
    reaches the frontend before its tokenization (a router may pick its worker then), and
    `withdraw(request_id)`, called once the response has ended (undoes an announcement whose
    request never reached `generate`; a no-op otherwise). See `RouterBackend.announce`."""

    def models(self) -> list[ModelCard]:
        """Models that have (or had) workers, whether or not one is live right now."""
        ...

    def is_ready(self, model: str) -> bool:
        """True when at least one live worker serves `model`."""
        ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[EngineOutput]:
        """Stream a request's outputs; the last one has `finish_reason` set.

        Raises ModelNotFoundError, OverloadedError (no live worker / all busy), WorkerLostError
        (the worker died mid-stream), InvalidRequestError (the worker refused it). Closing the
        iterator early (client disconnect) cancels the request on the worker and frees its KV.
        """
        ...

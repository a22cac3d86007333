"""When to disaggregate a request: a pure decision from the prompt and the live pools.

    remote  prefill on a prefill worker, move the KV, decode on a decode worker
    local   the decode (or aggregated) worker prefills the prompt itself
    refuse  disaggregation is enforced and no prefill worker is live

A short prompt is cheaper to prefill where it decodes than to ship: its prefill costs about one
decode step, while a remote prefill adds a round trip and a transfer. The threshold is the knob;
a cost model (expected TTFT and ITL impact from measured step times) replaces it later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["remote", "local", "refuse"]


@dataclass(frozen=True)
class DisaggPolicy:
    min_remote_prompt_tokens: int = 64
    """Prompts shorter than this are prefilled locally on the decode worker."""
    enforce: bool = False
    """Never prefill on a decode worker: without a live prefill worker, refuse (503)."""

    def __post_init__(self) -> None:
        if self.min_remote_prompt_tokens < 0:
            raise ValueError("min_remote_prompt_tokens must be >= 0")

    def mode(self, prompt_tokens: int, max_tokens: int, have_prefill: bool, have_decode: bool) -> Mode:
        if not have_prefill:
            return "refuse" if self.enforce else "local"
        if not have_decode:
            return "local"  # prefill workers then serve whole requests: better than refusing
        if self.enforce:
            return "remote"
        if prompt_tokens < self.min_remote_prompt_tokens or max_tokens <= 1:
            return "local"
        return "remote"

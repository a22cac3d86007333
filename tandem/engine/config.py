"""Engine configuration: one frozen dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks in the pool; None lets the executor size it from `kv_cache_bytes`."""
    kv_cache_bytes: int = 512 * 1024 * 1024
    """Memory for KV blocks when `num_blocks` is None."""
    max_num_seqs: int = 256
    """Most requests running in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (all requests' new tokens together)."""
    max_model_len: int | None = None
    """Context length; None takes the model's."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    cache_blocks_on_schedule: bool = False
    """Put a full block in the prefix cache when a step schedules its tokens, not after the step
    computed them, so a request admitted later in the same step can already share it (vLLM v1 and
    Dynamo's mocker do this). Only for executors that write a step's KV before any of the step's
    attention reads it; the fleet simulator turns it on to match Dynamo's replay."""
    long_prefill_token_threshold: int = 0
    """Cap on one request's new tokens per step (0: no cap beyond the step budget), so a long prompt
    shares steps with others' decodes."""
    scheduler_delay_factor: float = 0.0
    """While requests are decoding, admit new prompts only once the oldest waiting one has waited
    this many times the last prompt step's duration (vLLM's `--scheduler-delay-factor`). Arrivals
    then share one prefill step instead of each stretching a decode step: lower ITL under load, for
    a bounded TTFT cost. 0: admit at once."""
    regroup_steps: float = 2.0
    """When nothing is decoding, hold new prompts while fewer have arrived than requests finished
    lately (see `regroup_window_steps`), at most this many times the last decode step's duration,
    so a batch that ended together prefills together again (why: `tandem.engine.regroup`).
    0: start at once."""
    regroup_window_steps: float = 2.0
    """Finishes count for the regroup hold if they came at most this many times the last decode
    step's duration before the oldest waiting prompt: how long a client and the frontend may take to
    bring a finished request's replacement in. Here a c=16 replacement sometimes came 14 ms after
    its batch ended (past 2 steps, 11.6 ms); a window of 6 then regrouped it, but also held c=64's
    first replacements, whose batch comes in over 20-60 ms (docs/benchmarks.md, session 14)."""

    regroup_expect_steps: float = 0.0
    """The hold's limit while prompts that routers announced (picked for this worker as they reached
    the frontend, before tokenization) would complete a turnover and are due within `regroup_steps`:
    it waits for them up to this many decode steps (why: `tandem.engine.regroup`). 0 (the default):
    ignore announcements. Off by default: 4 steps helped a c=16 closed loop's TTFT p99 in some runs,
    not in others, and cost c=64's TTFT p50 (docs/benchmarks.md, session 17)."""

    regroup_pace_steps: float = 4.0
    """While a held turnover is short of prompts, the hold's limit may stretch up to this many decode
    steps after its oldest prompt if, at the pace the turnover's prompts have come, the missing ones
    are due by then (why: `tandem.engine.regroup`). No stretch when it is not above `regroup_steps`
    (0: off). A c=16 closed loop's replacements come ~1.5 ms apart, and the last ones came a few ms
    past the 2-step limit (docs/benchmarks.md, session 19)."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        if not 0 <= self.scheduler_delay_factor <= 100:
            raise ValueError(f"scheduler_delay_factor must be in [0, 100], got {self.scheduler_delay_factor}")
        if not 0 <= self.regroup_steps <= 100:
            raise ValueError(f"regroup_steps must be in [0, 100], got {self.regroup_steps}")
        if not 0 <= self.regroup_expect_steps <= 100:
            raise ValueError(f"regroup_expect_steps must be in [0, 100], got {self.regroup_expect_steps}")
        if not 0 <= self.regroup_pace_steps <= 100:
            raise ValueError(f"regroup_pace_steps must be in [0, 100], got {self.regroup_pace_steps}")
        if not 0 <= self.regroup_window_steps <= 100:
            raise ValueError(f"regroup_window_steps must be in [0, 100], got {self.regroup_window_steps}")

"""KV router flags shared by `tandem serve` and `tandem sim`: `--router-overlap-weight` and friends.

Each flag left out keeps the tuned value (`router/kv_policy.py` TUNED; no busy limit); the ones
given become `KvPolicyConfig` fields for the `kv` and `kv-approx` policies. A busy worker takes no
new request; when all are busy a request is refused (503) or, with `tandem serve --router-queue-size`,
waits for room.
"""

from __future__ import annotations

import argparse

FLAGS = (
    ("overlap_weight", float, "weight of the prefill blocks a cache hit saves (higher: follow the cache)"),
    ("decode_weight", float, "weight of active KV blocks (decode load)"),
    ("queued_weight", float, "weight of prefill tokens queued on the worker, in blocks"),
    ("temperature", float, "0: argmin; > 0: softmax sampling over costs"),
    ("long_prompt_tokens", int, "longer prompts weigh decode load less, the prefill queue more (0: off)"),
    ("busy_threshold", float, "a worker whose active KV blocks reach this share of its cache is busy"),
    ("busy_prefill_tokens", int, "a worker with this many prefill tokens queued is busy"),
)


def add_kv_policy_args(p: argparse.ArgumentParser) -> None:
    for field, kind, what in FLAGS:
        flag = "--router-" + field.replace("_", "-")
        p.add_argument(flag, type=kind, default=None, help=f"kv policies: {what} (default: tuned)")


def kv_policy_from_args(args: argparse.Namespace) -> dict[str, float]:
    """The KV policy fields the command line set (empty: all tuned)."""
    out: dict[str, float] = {}
    for field, _kind, _what in FLAGS:
        value = getattr(args, "router_" + field)
        if value is not None:
            out[field] = value
    return out


def add_queue_args(p: argparse.ArgumentParser) -> None:
    """The router's wait queue for requests that find every worker busy (`router/admission.py`)."""
    p.add_argument(
        "--router-queue-size",
        type=int,
        default=0,
        help="with a busy limit: requests that may wait for room when every worker is busy (0: refuse)",
    )
    p.add_argument(
        "--router-queue-timeout", type=float, default=30.0, help="seconds a request may wait, then refused"
    )

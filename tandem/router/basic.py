"""Basic routing policies behind one interface: round-robin, random, least-loaded.

A `Policy` sees the request and the candidates (live, ready workers of the request's model, as
`policy.WorkerLoad`) and returns a worker id. It does no I/O; the only state is a counter or a seeded
RNG, so table tests pin its choices. The pure functions live in `router/policy.py` next to the
KV-aware one, which slots in behind this same `pick` signature.

These three never look at the prompt, so they also offer `pick_early(candidates)`: the router may
pick as a request reaches the frontend, before its template and tokenizer run, and tell the worker
it is coming (`RouterBackend.announce`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from tandem.protocol.messages import GenerateRequest
from tandem.router.policy import WorkerLoad, pick_least_loaded, pick_random, pick_round_robin


class Policy(Protocol):
    name: str

    def pick(self, request: GenerateRequest, candidates: Sequence[WorkerLoad]) -> str:
        """The chosen candidate's worker_id. `candidates` is non-empty."""
        ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = 0

    def pick(self, request: GenerateRequest, candidates: Sequence[WorkerLoad]) -> str:
        return self.pick_early(candidates)

    def pick_early(self, candidates: Sequence[WorkerLoad]) -> str:
        assert candidates, "pick() needs at least one candidate"
        # Sorted, so the rotation stays fair while the worker set changes under us.
        choice = pick_round_robin(sorted(candidates, key=lambda w: w.worker_id), self._counter)
        self._counter += 1
        return choice


class Random:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, request: GenerateRequest, candidates: Sequence[WorkerLoad]) -> str:
        return self.pick_early(candidates)

    def pick_early(self, candidates: Sequence[WorkerLoad]) -> str:
        assert candidates, "pick() needs at least one candidate"
        return pick_random(list(candidates), self._rng)


class LeastLoaded:
    """Fewest active requests, then fewest active KV blocks, then the lowest id."""

    name = "least-loaded"

    def pick(self, request: GenerateRequest, candidates: Sequence[WorkerLoad]) -> str:
        return self.pick_early(candidates)

    def pick_early(self, candidates: Sequence[WorkerLoad]) -> str:
        assert candidates, "pick() needs at least one candidate"
        return pick_least_loaded(candidates)


POLICIES: dict[str, type[RoundRobin] | type[Random] | type[LeastLoaded]] = {
    p.name: p for p in (RoundRobin, Random, LeastLoaded)
}


KV_POLICIES = ("kv", "kv-approx")
"""KV-aware policies (`router/kv_policy.py`): with KV events, or approximate (predicted from routing)."""

KV_POLICY_FIELDS = (
    "overlap_weight",
    "decode_weight",
    "queued_weight",
    "temperature",
    "long_prompt_tokens",
    "busy_threshold",
    "busy_prefill_tokens",
)
"""`KvPolicyConfig` fields a deployment may set for the KV-aware policies (`tandem serve --router-*`)."""

APPROX_TTL_S = 600.0
"""kv-approx: the longest a routed prefix is assumed cached on its worker. Each worker's predicted
cache is also bounded by its KV capacity (LRU), which is what usually ends a prediction; on the
Mooncake trace 600 s beat 120 s (too short for 8 workers' caches) at 4 and 8 workers alike."""


def check_kv_policy(name: str, fields: Mapping[str, float]) -> None:
    """Raise ValueError unless `fields` are known, valid KV policy fields and `name` is a KV policy."""
    if not fields:
        return
    unknown = set(fields) - set(KV_POLICY_FIELDS)
    if unknown:
        raise ValueError(f"unknown router settings {sorted(unknown)}; allowed: {list(KV_POLICY_FIELDS)}")
    if name not in KV_POLICIES:
        raise ValueError(f"router weights apply to the {' and '.join(KV_POLICIES)} policies, not {name!r}")
    from tandem.router.policy import KvPolicyConfig

    KvPolicyConfig(**fields)  # validates the values


def make_policy(name: str, kv_policy: Mapping[str, float] | None = None) -> Policy:
    """A fresh policy by its CLI name; `kv_policy` fields replace the KV policies' tuned ones.
    Raises ValueError for an unknown name or weights that do not apply."""
    check_kv_policy(name, kv_policy or {})
    if name in KV_POLICIES:
        from dataclasses import replace

        from tandem.router.kv import KvRouterConfig
        from tandem.router.kv_policy import TUNED, KvPolicy

        ttl = APPROX_TTL_S if name == "kv-approx" else None
        policy = replace(TUNED, **kv_policy) if kv_policy else TUNED
        return KvPolicy(KvRouterConfig(policy=policy, approx_ttl=ttl, batch_queued_prefill=True))
    try:
        return POLICIES[name]()
    except KeyError:
        names = ", ".join((*POLICIES, *KV_POLICIES))
        raise ValueError(f"unknown router policy {name!r}; choose one of {names}") from None

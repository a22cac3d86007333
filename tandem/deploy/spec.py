"""Deployment spec: what `tandem serve` launches, from flags or from one YAML file.

    model: {path: ./models/tiny, served_name: tiny}
    frontend: {host: 127.0.0.1, port: 8000}    # processes: 2 -> two frontend processes on the port
    router: {policy: least-loaded}          # or {policy: kv, overlap_weight: 10, busy_threshold: 0.9,
                                            #     queue_size: 256, queue_timeout: 30, ...}
    pools:
      - {name: agg, role: agg, replicas: 2, engine: sim, speedup: 10, engine_args: {num_blocks: 4096}}

Relative model paths are taken from the directory `tandem serve` runs in. Frozen and validated at
construction; unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tandem import env
from tandem.engines.factory import ENGINES
from tandem.router.basic import KV_POLICIES, KV_POLICY_FIELDS, POLICIES, check_kv_policy

ROLES = ("agg", "prefill", "decode")
ENGINE_ARGS = (
    "block_size",
    "num_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "scheduler_delay_factor",
    "regroup_steps",
    "regroup_window_steps",
    "regroup_expect_steps",
    "regroup_pace_steps",
)


@dataclass(frozen=True)
class PoolSpec:
    """A set of identical workers."""

    name: str = "agg"
    role: str = "agg"
    replicas: int = 1
    engine: str = "builtin"
    speedup: float = 1.0
    """Sim engine: how much faster than modelled time."""
    dtype: str = "bfloat16"
    device: str = "cpu"
    hardware: dict[str, Any] = field(default_factory=dict)
    """What the pool needs (device type, count, memory): informational until a scheduler uses it."""
    engine_args: dict[str, float] = field(default_factory=dict)
    """EngineConfig fields passed as worker flags (block_size, num_blocks, ...)."""
    kv_hold_timeout: float = 120.0
    """Prefill workers: free KV blocks that no decode worker read within this many seconds."""
    cpus: list[int] = field(default_factory=list)
    """Pin replica i to CPU core cpus[i % len(cpus)] (empty: no pinning). The engine then sizes its
    thread pool to the one core, so pinned workers do not fight over cores."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"pool {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if any(c < 0 for c in self.cpus):
            raise ValueError(f"pool {self.name!r}: cpus must be core numbers >= 0")
        if self.replicas < 0:
            raise ValueError(f"pool {self.name!r}: replicas must be >= 0")
        if self.engine not in ENGINES:
            raise ValueError(f"pool {self.name!r}: engine must be one of {ENGINES}, got {self.engine!r}")
        if self.speedup <= 0:
            raise ValueError(f"pool {self.name!r}: speedup must be > 0")
        unknown = set(self.engine_args) - set(ENGINE_ARGS)
        if unknown:
            raise ValueError(
                f"pool {self.name!r}: unknown engine_args {sorted(unknown)}, known {ENGINE_ARGS}"
            )

    def worker_args(self) -> list[str]:
        """`tandem worker` flags for one replica (model, registry and id are added by the launcher)."""
        args = ["--engine", self.engine, "--role", self.role, "--dtype", self.dtype, "--device", self.device]
        if self.engine == "sim":
            args += ["--speedup", str(self.speedup)]
        if self.kv_hold_timeout != 120.0:
            args += ["--kv-hold-timeout", str(self.kv_hold_timeout)]
        for key, value in sorted(self.engine_args.items()):
            args += [f"--{key.replace('_', '-')}", str(value)]
        return args


def default_frontends() -> int:
    """Frontend processes where a deployment does not say: two where this process may run on two
    or more CPUs, one on a single CPU. One Python frontend is one event loop: a closed loop's
    turnover (parse, template, tokenize, route for each new request) and every stream's tokens wait
    for each other there. A second process on another core took a c=64 closed loop's TTFT p50 from
    16 ms behind Dynamo's multi-threaded frontend to 2 ms ahead on 2 vCPUs, for ~20% more frontend
    CPU per token at c=16 and 1.6% of a core per idle process (docs/benchmarks.md, session 22)."""
    return 2 if env.usable_cpus() >= 2 else 1


@dataclass(frozen=True)
class DeploymentSpec:
    model: str
    """Checkpoint folder the workers load and the frontend reads the tokenizer from."""
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "round-robin"
    pools: tuple[PoolSpec, ...] = (PoolSpec(),)
    name: str = "tandem"
    disagg_min_prompt_tokens: int = 64
    """Prompts shorter than this prefill on the decode worker (conditional disaggregation)."""
    enforce_disagg: bool = False
    """Refuse (503) rather than prefill on a decode worker when no prefill worker is live."""
    kv_policy: Mapping[str, float] = field(default_factory=dict)
    """KV policies only: `KvPolicyConfig` fields (`KV_POLICY_FIELDS`: overlap_weight, decode_weight,
    queued_weight, temperature, long_prompt_tokens, busy_threshold, busy_prefill_tokens) replacing
    the tuned ones; empty: all tuned, no busy limit."""
    queue_size: int = 0
    """Requests that may wait for a worker under its busy limit (0: refuse them at once with 503)."""
    queue_timeout: float = 30.0
    """Seconds a request waits in that queue before a 503."""
    frontends: int = field(default_factory=default_frontends)
    """HTTP frontend processes sharing the port (`tandem serve --frontends`, `frontend: {processes}`);
    by default `default_frontends()`."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES and self.policy not in KV_POLICIES:
            known = (*POLICIES, *KV_POLICIES)
            raise ValueError(f"router policy must be one of {known}, got {self.policy!r}")
        check_kv_policy(self.policy, self.kv_policy)
        if not self.pools or sum(p.replicas for p in self.pools) == 0:
            raise ValueError("the deployment has no workers")
        if self.disagg_min_prompt_tokens < 0:
            raise ValueError("disagg_min_prompt_tokens must be >= 0")
        if self.queue_size < 0 or self.queue_timeout <= 0:
            raise ValueError("queue_size must be >= 0 and queue_timeout > 0")
        if self.queue_size and not {"busy_threshold", "busy_prefill_tokens"} & set(self.kv_policy):
            raise ValueError(
                "queue_size holds requests that find every worker busy: set busy_threshold or "
                "busy_prefill_tokens (kv and kv-approx policies) for it to apply"
            )
        if self.frontends < 1:
            raise ValueError("frontends (frontend processes) must be >= 1")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")

    @property
    def disaggregated(self) -> bool:
        return any(p.role != "agg" for p in self.pools)

    @property
    def num_workers(self) -> int:
        return sum(p.replicas for p in self.pools)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentSpec:
        _check_keys("deployment", data, {"name", "model", "frontend", "router", "pools"})
        model = data.get("model")
        if isinstance(model, str):
            model = {"path": model}
        if not isinstance(model, dict) or "path" not in model:
            raise ValueError("the deployment needs `model: {path: <checkpoint folder>}`")
        _check_keys("model", model, {"path", "served_name"})
        frontend = data.get("frontend") or {}
        _check_keys("frontend", frontend, {"host", "port", "processes"})
        processes = frontend.get("processes")
        router = data.get("router") or {}
        router_keys = {"policy", "disagg_min_prompt_tokens", "enforce_disagg", "queue_size", "queue_timeout"}
        router_keys.update(KV_POLICY_FIELDS)
        _check_keys("router", router, router_keys)
        pools = []
        known = {f.name for f in fields(PoolSpec)}
        for raw in data.get("pools") or []:
            _check_keys("pool", raw, known)
            pools.append(PoolSpec(**raw))
        return cls(
            model=str(model["path"]),
            served_name=model.get("served_name"),
            host=frontend.get("host", "127.0.0.1"),
            port=int(frontend.get("port", 8000)),
            frontends=int(processes) if processes is not None else default_frontends(),
            policy=router.get("policy", "round-robin"),
            pools=tuple(pools),
            name=data.get("name", "tandem"),
            disagg_min_prompt_tokens=int(router.get("disagg_min_prompt_tokens", 64)),
            enforce_disagg=bool(router.get("enforce_disagg", False)),
            kv_policy={k: _number(router[k]) for k in KV_POLICY_FIELDS if k in router},
            queue_size=int(_number(router.get("queue_size", 0))),
            queue_timeout=float(_number(router.get("queue_timeout", 30.0))),
        )

    def to_dict(self) -> dict[str, Any]:
        """The deployment in `from_dict`'s shape (what `tandem serve` hands its other frontends)."""
        router: dict[str, Any] = {
            "policy": self.policy,
            "disagg_min_prompt_tokens": self.disagg_min_prompt_tokens,
            "enforce_disagg": self.enforce_disagg,
            "queue_size": self.queue_size,
            "queue_timeout": self.queue_timeout,
            **self.kv_policy,
        }
        return {
            "name": self.name,
            "model": {"path": self.model, "served_name": self.served_name},
            "frontend": {"host": self.host, "port": self.port, "processes": self.frontends},
            "router": router,
            "pools": [asdict(p) for p in self.pools],
        }

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentSpec:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"router weights must be numbers, got {value!r}")
    return value


def _check_keys(what: str, data: Any, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; allowed: {sorted(allowed)}")

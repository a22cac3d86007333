"""Deployment spec: YAML parsing, validation, worker flags; the shipped examples parse."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from tandem.cli import worker
from tandem.cli.serve import spec_from_args
from tandem.deploy.spec import ENGINE_ARGS, DeploymentSpec, PoolSpec, default_frontends

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_agg_example() -> None:
    spec = DeploymentSpec.from_yaml(EXAMPLES / "agg.yaml")
    assert not spec.disaggregated and spec.num_workers == 2 and spec.policy == "least-loaded"
    assert spec.served_name == "tiny" and spec.port == 8000
    args = spec.pools[0].worker_args()
    assert args[args.index("--engine") + 1] == "sim" and args[args.index("--num-blocks") + 1] == "4096"


def test_disagg_example_is_recognised_as_disaggregated() -> None:
    spec = DeploymentSpec.from_yaml(EXAMPLES / "disagg.yaml")
    assert spec.disaggregated and {p.role for p in spec.pools} == {"prefill", "decode"}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"pools": [{"replicas": 1}]}, "model"),
        ({"model": "m", "pools": [{"replica": 1}]}, "unknown pool keys"),
        ({"model": "m", "router": {"policy": "smart"}, "pools": [{}]}, "router policy"),
        ({"model": "m", "pools": [{"role": "both"}]}, "role"),
        ({"model": "m", "pools": [{"engine": "vllm"}]}, "engine"),
        ({"model": "m", "pools": [{"replicas": 0}]}, "no workers"),
        ({"model": "m", "pools": [{"engine_args": {"blocksize": 8}}]}, "unknown engine_args"),
        ({"model": "m", "pools": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"model": "m", "frontend": {"prot": 1}, "pools": [{}]}, "unknown frontend keys"),
        ({"model": "m", "router": {"policy": "random", "overlap_weight": 2}, "pools": [{}]}, "apply to"),
        ({"model": "m", "router": {"policy": "kv", "decode_weight": -1}, "pools": [{}]}, ">= 0"),
        ({"model": "m", "router": {"policy": "kv", "overlap": 2}, "pools": [{}]}, "unknown router keys"),
        ({"model": "m", "router": {"policy": "kv", "queued_weight": "2"}, "pools": [{}]}, "numbers"),
        ({"model": "m", "router": {"policy": "kv", "queue_size": 8}, "pools": [{}]}, "set busy_threshold"),
        ({"model": "m", "router": {"policy": "kv", "busy_threshold": 0}, "pools": [{}]}, "busy_threshold"),
        (
            {"model": "m", "router": {"policy": "least-loaded", "busy_threshold": 0.9}, "pools": [{}]},
            "apply to",
        ),
        (
            {
                "model": "m",
                "router": {"policy": "kv", "busy_threshold": 0.9, "queue_size": -1},
                "pools": [{}],
            },
            "queue_size",
        ),
    ],
)
def test_invalid_specs(data: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        DeploymentSpec.from_dict(data)


def _serve_args(*flags: str) -> argparse.Namespace:
    from tandem.cli.main import build_parser

    return build_parser().parse_args(["serve", *flags])


def test_spec_from_flags() -> None:
    ns = _serve_args(
        "--model", "models/tiny", "--port", "9000", "--workers", "3", "--engine", "sim",
        "--router", "random", "--speedup", "5", "--dtype", "float32", "--num-blocks", "100",
    )  # fmt: skip
    spec = spec_from_args(ns)
    assert spec.num_workers == 3 and spec.policy == "random" and spec.port == 9000
    assert not spec.disaggregated
    assert spec.pools[0] == PoolSpec(
        name="worker", replicas=3, engine="sim", speedup=5.0, dtype="float32", engine_args={"num_blocks": 100}
    )


def test_disaggregated_spec_from_flags() -> None:
    ns = _serve_args(
        "--model", "m", "--prefill-workers", "2", "--decode-workers", "1", "--engine", "sim",
        "--disagg-min-prompt-tokens", "128", "--enforce-disagg",
    )  # fmt: skip
    spec = spec_from_args(ns)
    assert spec.disaggregated and spec.num_workers == 3
    assert [(p.role, p.replicas) for p in spec.pools] == [("prefill", 2), ("decode", 1)]
    assert spec.disagg_min_prompt_tokens == 128 and spec.enforce_disagg


def test_kv_policy_from_yaml_and_flags() -> None:
    data = {"model": "m", "router": {"policy": "kv", "overlap_weight": 20, "queued_weight": 2}, "pools": [{}]}
    spec = DeploymentSpec.from_dict(data)
    assert spec.kv_policy == {"overlap_weight": 20.0, "queued_weight": 2.0}
    ns = _serve_args(
        "--model", "m", "--router", "kv", "--router-overlap-weight", "20", "--router-decode-weight", "0",
        "--router-long-prompt-tokens", "8192",
    )  # fmt: skip
    spec = spec_from_args(ns)
    assert spec.kv_policy == {"overlap_weight": 20.0, "decode_weight": 0.0, "long_prompt_tokens": 8192}
    assert spec_from_args(_serve_args("--model", "m", "--router", "kv")).kv_policy == {}
    with pytest.raises(ValueError, match="apply to"):
        spec_from_args(_serve_args("--model", "m", "--router-queued-weight", "2"))


def test_busy_limits_and_wait_queue_from_yaml_and_flags() -> None:
    router = {"policy": "kv", "busy_threshold": 0.9, "busy_prefill_tokens": 16384, "queue_size": 64}
    spec = DeploymentSpec.from_dict({"model": "m", "router": {**router, "queue_timeout": 5}, "pools": [{}]})
    assert spec.kv_policy == {"busy_threshold": 0.9, "busy_prefill_tokens": 16384}
    assert spec.queue_size == 64 and spec.queue_timeout == 5.0
    ns = _serve_args(
        "--model", "m", "--router", "kv", "--router-busy-prefill-tokens", "8192", "--router-queue-size", "16",
    )  # fmt: skip
    spec = spec_from_args(ns)
    assert spec.kv_policy == {"busy_prefill_tokens": 8192}
    assert spec.queue_size == 16 and spec.queue_timeout == 30.0
    no_queue = spec_from_args(_serve_args("--model", "m", "--router", "kv", "--router-busy-threshold", "0.5"))
    assert no_queue.queue_size == 0, "a busy limit alone sheds with 503"


def test_every_engine_arg_reaches_the_workers_engine() -> None:
    # A deployment's engine_args become `tandem worker` flags, and each flag its EngineConfig field.
    values: dict[str, float] = {
        "block_size": 32,
        "num_blocks": 123,
        "max_num_seqs": 7,
        "max_num_batched_tokens": 999,
        "max_model_len": 512,
        "scheduler_delay_factor": 0.5,
        "regroup_steps": 1.5,
        "regroup_window_steps": 4.0,
        "regroup_expect_steps": 3.0,
        "regroup_pace_steps": 6.0,
    }
    assert set(values) == set(ENGINE_ARGS)
    parser = argparse.ArgumentParser()
    worker.add_parser(parser.add_subparsers())
    flags = PoolSpec(engine="sim", engine_args=values).worker_args()
    ns = parser.parse_args(["worker", "--model", "m", *flags])
    config = worker.engine_config_from_args(ns)
    assert {k: getattr(config, k) for k in values} == values
    # And `tandem serve`'s flags fill the engine_args.
    serve_flags = [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    serve_ns = _serve_args("--model", "m", *serve_flags)
    assert spec_from_args(serve_ns).pools[0].engine_args == values


def test_a_deployment_file_asks_for_frontend_processes_and_round_trips() -> None:
    spec = DeploymentSpec.from_dict(
        {
            "model": {"path": "m"},
            "frontend": {"port": 9000, "processes": 3},
            "pools": [{"name": "w", "replicas": 2, "engine": "sim"}],
        }
    )
    assert spec.frontends == 3
    # `tandem serve` hands the deployment to its other frontend processes as JSON.
    assert DeploymentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="frontends"):
        DeploymentSpec.from_dict({"model": "m", "frontend": {"processes": 0}, "pools": [{"name": "w"}]})


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (64, 2)])
def test_frontend_processes_default_to_two_on_two_or_more_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert default_frontends() == expected
    # Where neither the flags nor the deployment file say: the default, both ways in.
    assert spec_from_args(_serve_args("--model", "m")).frontends == expected
    pools = [{"name": "w", "engine": "sim"}]
    assert DeploymentSpec.from_dict({"model": "m", "pools": pools}).frontends == expected
    # Said: taken as said.
    assert spec_from_args(_serve_args("--model", "m", "--frontends", "1")).frontends == 1
    spec = DeploymentSpec.from_dict({"model": "m", "frontend": {"processes": 1}, "pools": pools})
    assert spec.frontends == 1


def test_the_first_frontend_refuses_a_port_another_deployment_shares() -> None:
    # Another deployment's frontends hold the port with SO_REUSEPORT: a new deployment must not
    # join them (it would take half of their connections); its later frontends may.
    import socket

    from tandem.cli.frontend import listen

    other = listen("127.0.0.1", 0, reuse_port=True)
    port = other.getsockname()[1]
    with pytest.raises(OSError):
        listen("127.0.0.1", port, reuse_port=True)
    joined = listen("127.0.0.1", port, reuse_port=True, first=False)
    for s in (joined, other):
        s.close()
    free = listen("127.0.0.1", port, reuse_port=True)  # free again: the first one binds
    assert free.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    free.close()

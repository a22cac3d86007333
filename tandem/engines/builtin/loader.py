"""Reading a Hugging Face model folder: config.json into a `ModelConfig`, *.safetensors into tensors.

Contract: every way a folder can be unusable (missing, no or malformed config.json, no safetensors,
an architecture the built-in model does not implement, a tensor the model needs but the files lack)
raises `CheckpointError` with a message that names the problem. Nothing here builds the model; it
only answers "what shape is it" and "give me tensor X". Tensors are read through
`safetensors.safe_open`, which memory-maps the files, so only the tensors asked for are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tandem.protocol.errors import CheckpointError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """The parts of config.json the built-in Llama-family decoder needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None for plain RoPE; else a dict with `rope_type` "llama3" or "linear" and its factors."""
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Qwen2 always has q/k/v biases; Llama-style configs have them with `attention_bias`."""
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """Qwen3: an RMSNorm over head_dim on each query and key head before RoPE."""
    eos_token_ids: tuple[int, ...] = field(default=())


def load_config(model_dir: str | Path) -> ModelConfig:
    """Parse `model_dir/config.json` (and generation_config.json for extra EOS ids)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist or is not a folder")
    raw = _read_json(root / "config.json", required=True)
    assert raw is not None
    gen = _read_json(root / "generation_config.json", required=False) or {}
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{root / 'config.json'}: architecture {archs or 'missing'} is not supported by the "
            f"built-in engine; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope_theta, rope_scaling = _rope(raw)
        attention_bias = bool(raw.get("attention_bias", False))
        cfg = ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # HF Qwen2 hard-codes q/k/v biases and no o bias; Llama/Qwen3 put `attention_bias` on all four.
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch != "Qwen2ForCausalLM" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=_eos_ids(gen.get("eos_token_id"), raw.get("eos_token_id")),
        )
    except KeyError as e:
        raise CheckpointError(f"{root / 'config.json'} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{root / 'config.json'} has a malformed field: {e}") from None
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{root / 'config.json'}: hidden_act {act!r} is not supported (only silu)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError(
            f"num_attention_heads ({cfg.num_heads}) is not a multiple of num_key_value_heads "
            f"({cfg.num_kv_heads})"
        )
    return cfg


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing: a Hugging Face model folder needs config.json")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling). transformers 5 writes both into `rope_parameters`; 4.x used
    top-level `rope_theta` and `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    return theta, params


def _eos_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for v in values:
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


class TensorSource:
    """Name -> tensor over the folder's safetensors files (one file, or shards with an index)."""

    def __init__(self, files: dict[str, Any], where: dict[str, str], root: Path) -> None:
        self._files = files
        self._where = where
        self._root = root

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"checkpoint {self._root} lacks the tensor {name!r}")
        t = self._files[self._where[name]].get_tensor(name)
        return t.to(device=device, dtype=dtype)


@contextmanager
def open_safetensors(model_dir: str | Path) -> Iterator[TensorSource]:
    """Open every safetensors file of the folder; the files close when the block exits."""
    root = Path(model_dir)
    index_path = root / "model.safetensors.index.json"
    index = _read_json(index_path, required=False)
    weight_map: dict[str, str] = {}
    if index is not None:
        weight_map = index.get("weight_map")  # type: ignore[assignment]
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no 'weight_map' object")
        shard_names = sorted(set(weight_map.values()))
    else:
        shard_names = sorted(p.name for p in root.glob("*.safetensors"))
        if not shard_names:
            raise CheckpointError(f"no *.safetensors files in {root}")
    with ExitStack() as stack:
        files: dict[str, Any] = {}
        for name in shard_names:
            path = root / name
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in the shard index but missing")
            try:
                files[name] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        if index is not None:
            where = dict(weight_map)
        else:
            where = {k: name for name, f in files.items() for k in f.keys()}
        yield TensorSource(files, where, root)

"""KV layouts meet tensors: build one from a tensor or a checkpoint config, check two agree."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tandem.protocol.errors import TransferFailedError
from tandem.protocol.kv_layout import KvLayout

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

__all__ = ["KvLayout", "check_compatible", "layout_from_config", "layout_of", "torch_dtype"]


def torch_dtype(layout: KvLayout) -> torch.dtype:
    return DTYPES[layout.dtype]


def layout_of(kv: torch.Tensor, model: str = "") -> KvLayout:
    layers, _, two, heads, block_size, head_dim = kv.shape
    assert two == 2, f"expected [layers, blocks, 2, heads, block, dim], got {tuple(kv.shape)}"
    return KvLayout(layers, block_size, heads, head_dim, DTYPE_NAMES[kv.dtype], model)


def layout_from_config(
    model_dir: str | Path, block_size: int, dtype: str, model: str, engine: str
) -> KvLayout:
    """The layout an engine will have for a Hugging Face checkpoint's config.json."""
    path = Path(model_dir) / "config.json"
    # The simulated engine may run on a folder without a config: its layout then only names the model.
    cfg = json.loads(path.read_text()) if path.is_file() or engine != "sim" else {}
    heads = int(cfg.get("num_attention_heads", 1))
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", heads)) // heads)
    return KvLayout(
        num_layers=int(cfg.get("num_hidden_layers", 1)),
        block_size=block_size,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        dtype=dtype,
        model=model,
        engine=engine,
    )


def check_compatible(local: KvLayout, remote: KvLayout) -> None:
    """Raise a clear TransferFailedError naming every field where the two workers differ."""
    diffs = local.differences(remote)
    if diffs:
        raise TransferFailedError("KV layouts differ, refusing to move blocks (" + "; ".join(diffs) + ")")

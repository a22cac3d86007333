"""The paged KV cache tensor: its layout, how many blocks fit a byte budget, and allocation.

Layout, one tensor for the whole model:

    kv_cache: [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]
                                       ^ 0 = K, 1 = V

so one block's K and V for one layer are one contiguous run of `bytes_per_block / num_layers`
bytes, and `kv_cache[:, block_ids]` gathers every layer's bytes of some blocks in one indexing op
(what a KV transfer between workers copies). `kv_cache[layer]` is the per-layer view the attention
writes into; inside a block each KV head's keys (then values) are contiguous (see `attention.py`).
The tensor starts zeroed: padded decode batches read unused slots (masked out, but a NaN there
would still poison the softmax-weighted sum).
"""

from __future__ import annotations

import torch

from tandem.engines.builtin.loader import ModelConfig


def kv_cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, num_blocks, 2, cfg.num_kv_heads, block_size, cfg.head_dim)


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def num_blocks_for_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget: int) -> int:
    per_block = bytes_per_block(cfg, block_size, dtype)
    n = budget // per_block
    if n < 1:
        raise ValueError(f"kv_cache_bytes={budget} is less than one KV block ({per_block} bytes)")
    return n


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.zeros(kv_cache_shape(cfg, num_blocks, block_size), dtype=dtype, device=device)

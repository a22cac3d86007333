"""What a KV block looks like in memory, so two workers can check they can exchange blocks.

Every engine that takes part in KV transfer keeps its cache as one tensor

    kv: [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]      (2 = K, V)

so block b of layer l is one contiguous run of `layer_block_bytes` bytes at `kv[l, b]`.
"""

from __future__ import annotations

import msgspec
import torch

from tandem.protocol.errors import TransferFailedError

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class KvLayout(msgspec.Struct, frozen=True):
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    model: str = ""
    """The model's name or path; two workers exchange blocks only for the same model."""
    engine: str = "builtin"
    """"sim" for the simulated engine, whose blocks have no bytes: only the hand-off is real."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layer_block_shape(self) -> tuple[int, int, int, int]:
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def of(cls, kv: torch.Tensor, model: str = "") -> KvLayout:
        layers, _, two, block_size, heads, head_dim = kv.shape
        assert two == 2, f"expected [layers, blocks, 2, block, heads, dim], got {tuple(kv.shape)}"
        return cls(layers, block_size, heads, head_dim, DTYPE_NAMES[kv.dtype], model)


def check_compatible(local: KvLayout, remote: KvLayout) -> None:
    """Raise a clear TransferFailedError naming every field where the two workers differ."""
    diffs = [
        f"{f}: {getattr(remote, f)!r} there vs {getattr(local, f)!r} here"
        for f in KvLayout.__struct_fields__
        if getattr(local, f) != getattr(remote, f)
    ]
    if diffs:
        raise TransferFailedError("KV layouts differ, refusing to move blocks (" + "; ".join(diffs) + ")")

"""What a KV block looks like in memory: the facts two workers must share to exchange blocks.

Every engine that takes part in KV transfer keeps its cache as one tensor

    kv: [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]      (2 = K, V)

so block b of layer l is one contiguous run of `layer_block_bytes` bytes at `kv[l, b]`. Workers
publish their layout when they register; a prefill and a decode worker of one model with different
layouts are refused there, before any block moves.
"""

from __future__ import annotations

import msgspec

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
    def layer_block_shape(self) -> tuple[int, int, int, int]:
        return (2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def layer_block_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * ELEMENT_BYTES[self.dtype]

    def differences(self, other: KvLayout) -> list[str]:
        """Fields that differ, worded as `field: <other's> there vs <self's> here`."""
        return [
            f"{f}: {getattr(other, f)!r} there vs {getattr(self, f)!r} here"
            for f in KvLayout.__struct_fields__
            if getattr(self, f) != getattr(other, f)
        ]

"""The dtype the built-in engine computes in, given the one asked for and the hardware.

bfloat16 and float16 halve the weights' and the KV cache's bytes, and on hardware with arithmetic
for them (GPUs; CPUs with AVX512-BF16/AMX or AVX512-FP16, as oneDNN reports) they are also the
fast path. On a CPU without it, oneDNN and torch emulate them: measured on an AVX2-only AMD EPYC
(Zen 3), a [32, 576] x [576, 6144] bf16 matmul ran 4x slower than the same in float32 and the
one-row gemv 2x slower, so a whole SmolLM2 decode step at batch 32 ran ~3.5x slower in bf16.
There the engine loads the checkpoint in float32 instead (bf16 -> fp32 is exact, so the weights
keep their values; the result is at least as accurate) and keeps its KV cache in float32, at
twice the memory. TANDEM_CPU_HALF=native keeps the emulated type (e.g. to fit memory).
"""

from __future__ import annotations

import torch

from tandem import env

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_arithmetic(dtype: str) -> bool:
    """Whether this CPU computes `dtype` natively (oneDNN's own check of the ISA)."""
    if dtype == "bfloat16":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == "float16":
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def compute_dtype(requested: str, device: str | torch.device) -> str:
    """The dtype name the engine runs in for `requested` on `device` (see the module doc)."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if torch.device(device).type != "cpu" or cpu_has_arithmetic(requested):
        return requested
    return requested if env.cpu_half() == "native" else "float32"

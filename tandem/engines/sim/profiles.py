"""First-principles timing for a dense transformer on one GPU (or a TP group): a roofline per step.

`RooflineTiming` is a `TimingModel` derived from a model's shapes and a GPU's datasheet, not from a
measurement, so the simulator can stand in for hardware we do not have (a 70B model on H100s). One
step computes `T` prefill tokens (k requests, `pairs` causal query-key pairs) and `B` decode tokens
whose contexts sum to `C` tokens:

    linear FLOPs   = 2 * P_lin * (T + B) + 2 * V * d * (k + B)       every token through every matmul;
                                                                     the LM head only where sampled
    attention FLOPs = 4 * L * H * h * (pairs + C)                    QK^T and PV, 2 FLOPs a MAC each
    compute_ms     = linear / (FP8 peak * mfu) + attention / (BF16 peak * attn_mfu)
    memory_ms      = (W_read + KV_bytes(C + prefix of the chunks)) / (HBM bandwidth * mbu)

    combine="max":  step_ms = max(compute_ms, memory_ms) + overhead_ms      (roofline: one weight
                    read serves every token of the step, so decodes ride along a prefill chunk)
    combine="sum":  step_ms = max(prefill compute, W_read) + max(decode compute, W_read + KV) +
                    overhead_ms  (each part costed as if run alone, as Dynamo's mocker adds them;
                    an upper bound for a mixed step, equal to "max" for pure prefill or decode)

with P_lin the parameters of the attention and MLP matmuls, W_read those plus the LM head (the input
embedding is a row gather), L layers, H query heads of width h, V vocabulary, d hidden size. With
tensor parallelism over `tp` GPUs, peaks, bandwidth and memory scale by `tp`, and every step adds
2 * L ring all-reduces of its (T + B) x d BF16 activations.

`llama3_70b_h100_fp8()` is the profile benchmark 3 of "Disaggregated prefill/decode" uses; its
constants and their sources are in `LLAMA3_70B`, `H100_SXM` and the field docstrings below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tandem.engines.sim.timing import StepShape


@dataclass(frozen=True)
class TransformerShape:
    """A dense decoder-only transformer (Llama layout: GQA attention, gated MLP, untied LM head)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int

    @property
    def linear_params(self) -> int:
        """Matmul weights of all layers: q and o (d x H*h), k and v (d x Hkv*h), gate/up/down (d x I)."""
        d, q, kv = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = 2 * d * q + 2 * d * kv + 3 * d * self.intermediate
        return self.num_layers * per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Linear layers plus input embedding plus LM head (norms, ~1M, left out)."""
        return self.linear_params + 2 * self.embedding_params

    def kv_bytes_per_token(self, bytes_per_elem: float) -> float:
        """K and V of every layer: 2 x layers x KV heads x head dim x bytes (the mission's formula)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs for one (query, key) pair over all layers and heads: QK^T dot + PV axpy, 2 a MAC."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


LLAMA3_70B = TransformerShape(
    num_layers=80,
    hidden=8192,
    intermediate=28672,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    vocab=128256,
)
"""meta-llama/Meta-Llama-3-70B config.json. 68.45B linear + 2 x 1.05B embedding = 70.55B parameters;
KV 327,680 B/token in BF16, 163,840 B/token in FP8."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: float
    hbm_bytes_per_s: float
    fp8_flops: float
    """Dense (no sparsity) FP8 tensor-core peak."""
    bf16_flops: float
    """Dense BF16 tensor-core peak."""


H100_SXM = GpuSpec(
    name="H100 SXM5 80GB",
    hbm_bytes=80 * 2**30,
    hbm_bytes_per_s=3.35e12,
    fp8_flops=1979e12,
    bf16_flops=989e12,
)
"""NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3 (80 GiB; nvidia-smi shows 81,559 MiB),
3.35 TB/s, FP8 3,958 TFLOPS and BF16 1,979 TFLOPS *with sparsity*, i.e. 1,979 and 989 dense."""


@dataclass(frozen=True)
class RooflineTiming:
    """`TimingModel` for one GPU serving `model` (see the module docstring for the formulas)."""

    model: TransformerShape = LLAMA3_70B
    gpu: GpuSpec = H100_SXM
    weight_bytes_per_param: float = 1.0
    """FP8 weights (e.g. an FP8-dynamic Llama-3-70B checkpoint): 70.55 GB resident."""
    kv_bytes_per_elem: float = 1.0
    """FP8 KV cache (vLLM `--kv-cache-dtype fp8`), the usual companion of FP8 weights."""
    mfu: float = 0.5
    """Achieved fraction of FP8 peak in the prefill matmuls (990 effective TFLOPS; large-M FP8
    GEMMs on H100 reach 60-70% of peak, a whole forward pass less)."""
    attn_mfu: float = 0.5
    """Achieved fraction of BF16 peak in attention (FlashAttention-3 forward: 50-75%)."""
    mbu: float = 0.75
    """Achieved fraction of HBM bandwidth in memory-bound (decode) steps: 2.51 TB/s effective."""
    overhead_ms: float = 3.0
    """Fixed per-step cost: scheduling, input preparation, launches (CUDA-graph decode), sampling."""
    combine: Literal["max", "sum"] = "max"
    """How a mixed (chunked prefill + decode) step combines its parts; see the module docstring."""
    tp: int = 1
    """GPUs of one engine (tensor parallel): FLOPs, bandwidth and memory scale by `tp`, and each
    layer adds two all-reduces of the step's activations over NVLink."""
    nvlink_bytes_per_s: float = 450e9 * 0.7
    """All-reduce bus bandwidth: H100 NVLink 4 is 900 GB/s bidirectional (450 each way), ~70% of
    it achieved by NCCL / custom all-reduce on 8 GPUs."""
    allreduce_latency_s: float = 8e-6
    """Fixed cost of one small all-reduce (vLLM's custom all-reduce inside a CUDA graph)."""
    gpu_memory_utilization: float = 0.92
    """Fraction of HBM the engine may use (vLLM's `--gpu-memory-utilization`)."""
    activation_bytes: float = 1.5e9
    """Reserved for activations and workspace at an 8k-token step (profiled by vLLM at start)."""

    def __post_init__(self) -> None:
        for name in ("mfu", "attn_mfu", "mbu", "gpu_memory_utilization"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.combine not in ("max", "sum"):
            raise ValueError(f"combine must be 'max' or 'sum', got {self.combine!r}")
        if self.kv_capacity_tokens < 1:
            raise ValueError("the weights leave no memory for the KV cache")

    @property
    def weight_bytes(self) -> float:
        """Resident weights."""
        return self.model.total_params * self.weight_bytes_per_param

    @property
    def weight_read_bytes(self) -> float:
        """Weights a forward pass streams from HBM: every matmul and the LM head."""
        return (self.model.linear_params + self.model.embedding_params) * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_bytes_per_token(self.kv_bytes_per_elem)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV that fit beside the weights and activations."""
        usable = self.tp * (self.gpu.hbm_bytes * self.gpu_memory_utilization - self.activation_bytes)
        free = usable - self.weight_bytes
        return int(free // self.kv_bytes_per_token)

    def num_blocks(self, block_size: int) -> int:
        return self.kv_capacity_tokens // block_size

    def _linear_ms(self, tokens: int, sampled: int) -> float:
        m = self.model
        flops = 2.0 * m.linear_params * tokens + 2.0 * m.embedding_params * sampled
        return flops / (self.tp * self.gpu.fp8_flops * self.mfu) * 1e3

    def _allreduce_ms(self, tokens: int) -> float:
        """Two ring all-reduces a layer of `tokens` BF16 activation rows (0 without TP)."""
        if self.tp == 1:
            return 0.0
        m = self.model
        nbytes = tokens * m.hidden * 2 * 2 * (self.tp - 1) / self.tp
        per = nbytes / self.nvlink_bytes_per_s + self.allreduce_latency_s
        return 2 * m.num_layers * per * 1e3

    def _attn_ms(self, pairs: int) -> float:
        return self.model.attn_flops_per_pair * pairs / (self.tp * self.gpu.bf16_flops * self.attn_mfu) * 1e3

    def _memory_ms(self, kv_tokens: int) -> float:
        nbytes = self.weight_read_bytes + kv_tokens * self.kv_bytes_per_token
        return nbytes / (self.tp * self.gpu.hbm_bytes_per_s * self.mbu) * 1e3

    def step_ms(self, shape: StepShape) -> float:
        t, b = shape.prefill_tokens, shape.num_decodes
        if not t and not b:
            return 0.0
        pairs = shape.prefill_attn_pairs
        if t and not pairs:  # caller did not count pairs: one request of t tokens after the prefix
            pairs = t * shape.prefill_start_tokens + t * (t + 1) // 2
        k = max(shape.num_prefills, 1) if t else 0
        # All-reduces sit between the matmuls of a layer: they add to either bound, never overlap.
        comm = self._allreduce_ms(t + b)
        if self.combine == "max":
            compute = self._linear_ms(t + b, k + b) + self._attn_ms(pairs + shape.decode_kv_tokens)
            memory = self._memory_ms(shape.decode_kv_tokens + shape.prefill_start_tokens)
            return max(compute, memory) + comm + self.overhead_ms
        ms = self.overhead_ms + comm
        if t:
            compute = self._linear_ms(t, k) + self._attn_ms(pairs)
            ms += max(compute, self._memory_ms(shape.prefill_start_tokens))
        if b:
            compute = self._linear_ms(b, b) + self._attn_ms(shape.decode_kv_tokens)
            ms += max(compute, self._memory_ms(shape.decode_kv_tokens))
        return ms

    def prefill_ms(self, tokens: int, start: int = 0) -> float:
        """One request's prompt chunk of `tokens` after `start` computed ones, alone in its step."""
        return self.step_ms(StepShape(tokens, 0, 0.0, num_prefills=1, prefill_start_tokens=start))

    def decode_ms(self, batch: int, context_tokens: int) -> float:
        """A decode-only step of `batch` requests whose contexts sum to `context_tokens`."""
        return self.step_ms(StepShape(0, batch, 0.0, decode_kv_tokens=context_tokens))


def llama3_70b_h100_fp8(**overrides: object) -> RooflineTiming:
    """Llama-3-70B, FP8 weights and KV, one H100 SXM: ~42.6k KV tokens, 30.7 ms for one decode at
    1k context, 144 ms for a 1k-token prompt. Keyword arguments override `RooflineTiming` fields."""
    return RooflineTiming(**overrides)  # type: ignore[arg-type]

"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3), written with plain tensors.

Contract: `DecoderModel.load(model_dir, dtype, device)` reads a checkpoint through `loader`, and
`forward(input_ids, positions, attn, kv_caches, logits_rows)` runs one flattened step and returns
logits only for the rows asked for. The maths follows Hugging Face's modelling code (RMSNorm in
fp32, rotate-half RoPE, SwiGLU, GQA) so fp32 logits match it to rounding; no transformers code runs.

To cut per-layer Python and kernel overhead the loader fuses q/k/v into one matrix and gate/up into
another: a layer is two norms, four matmuls, RoPE and one attention call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.engines.builtin.attention import AttentionMetadata, paged_attention
from tandem.engines.builtin.loader import ModelConfig, TensorSource, load_config, open_safetensors

log = logging.getLogger(__name__)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(Hq + 2 * Hkv) * D, hidden]: q rows, then k rows, then v rows
    qkv_bias: torch.Tensor | None  # [(Hq + 2 * Hkv) * D]
    o: torch.Tensor  # [hidden, Hq * D]
    o_bias: torch.Tensor | None  # [hidden]
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D] (Qwen3): q_norm for query heads, k_norm for key heads
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows, then up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None
    packed: dict[str, torch.Tensor] = field(default_factory=dict)
    """oneDNN-prepacked copies of the matmul weights by field name ("qkv", "o", "gate_up",
    "down"), for multi-row steps on CPU (see `pack_weights`); empty when not packed."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Like HF: normalise in fp32, cast back, then scale (the order matters for bf16 parity).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device):
    """cos, sin: [max_len, head_dim] each, computed in fp32 and cast once (as HF does per step).

    `sin`'s first half is negated so that `apply_rope` can rotate with one `roll`:
    rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi], exactly (only a sign moves)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [max_len, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [f0..f(D/2-1), f0..f(D/2-1)]
    sin = emb.sin()
    sin[:, : dim // 2].neg_()
    return emb.cos().to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, signed_sin: [T, 1, D] rows of `rope_tables`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class DecoderModel:
    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        max_len: int,
    ) -> None:
        self.cfg = cfg
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.norm = norm  # [hidden]
        self.lm_head = lm_head  # [vocab, hidden]; the same tensor as `embed` when tied
        self.cos, self.sin = rope_tables(cfg, max_len, embed.dtype, embed.device)
        self.lm_head_packed: torch.Tensor | None = None
        self.q_size = cfg.num_heads * cfg.head_dim
        self.qk_size = self.q_size + cfg.num_kv_heads * cfg.head_dim

    @classmethod
    def load(
        cls, model_dir: str | Path, dtype: torch.dtype, device: torch.device, max_len: int | None = None
    ) -> DecoderModel:
        cfg = load_config(model_dir)
        with open_safetensors(model_dir) as src:
            prefix = "model." if "model.embed_tokens.weight" in src else ""

            def get(name: str) -> torch.Tensor:
                return src.get(prefix + name, dtype, device)

            embed = get("embed_tokens.weight")
            layers = [
                _load_layer(src, cfg, f"{prefix}layers.{i}.", dtype, device) for i in range(cfg.num_layers)
            ]
            norm = get("norm.weight")
            if "lm_head.weight" in src:
                lm_head = src.get("lm_head.weight", dtype, device)
            elif cfg.tie_word_embeddings:
                lm_head = embed
            else:
                lm_head = src.get("lm_head.weight", dtype, device)  # raises, naming the tensor
        return cls(cfg, embed, layers, norm, lm_head, max_len or cfg.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: one [num_blocks, 2, Hkv, bs, D] per layer;
        logits_rows: [S] rows to compute logits for. Returns [S, vocab] logits."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        num_heads, head_dim, qk_size, q_size = cfg.num_heads, cfg.head_dim, self.qk_size, self.q_size
        t = input_ids.shape[0]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D], shared by all layers and heads
        sin = self.sin[positions].unsqueeze(1)
        h = F.embedding(input_ids, self.embed)  # [T, hidden]
        gemv = _Gemv(self.embed.device)
        try:
            for w, kv_cache in zip(self.layers, kv_caches, strict=True):
                gemv.enter(t)
                x = rms_norm(h, w.input_norm, eps)
                qkv = _linear(x, w.qkv, w.qkv_bias, w.packed.get("qkv"))  # [T, (Hq + 2 Hkv) D]
                # Query and key heads are adjacent columns: norm and rotate them as one [T, Hq + Hkv, D].
                qk = qkv[:, :qk_size].view(t, -1, head_dim)
                if w.qk_norm is not None:
                    qk = rms_norm(qk, w.qk_norm, eps)
                qk = apply_rope(qk, cos, sin)
                v = qkv[:, qk_size:].view(t, -1, head_dim)
                gemv.exit()
                o = paged_attention(qk[:, :num_heads], qk[:, num_heads:], v, kv_cache, attn)  # [T, Hq, D]
                gemv.enter(t)
                h = _linear_add(h, o.reshape(t, q_size), w.o, w.o_bias, w.packed.get("o"))
                x = rms_norm(h, w.post_norm, eps)
                gate, up = _linear(x, w.gate_up, w.gate_up_bias, w.packed.get("gate_up")).chunk(2, dim=-1)
                h = _linear_add(h, F.silu(gate) * up, w.down, w.down_bias, w.packed.get("down"))
            h = rms_norm(h[logits_rows], self.norm, eps)  # only the rows that sample need the head
            gemv.enter(h.shape[0])
            return _linear(h, self.lm_head, None, self.lm_head_packed)
        finally:
            gemv.exit()

    def pack_weights(self) -> bool:
        """Prepack every matmul weight for oneDNN (CPU only). A packed weight skips the reorder
        oneDNN does on every call with a plain [N, K] tensor: on an AVX2 EPYC, fp32 [M, 576] x
        [576, 6144] ran 1.3-1.8x faster at M = 2..32 and 1.15x at M = 256, and a whole fp32
        one-token decode step ~1.3x faster. One-row steps in bf16/fp16 keep the plain weights
        (torch's gemv; see `_Gemv`). Costs a second copy of the weights. Returns False, packing
        nothing, where oneDNN cannot pack this dtype."""
        if self.embed.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        try:
            self.lm_head_packed = _pack(self.lm_head)
            for w in self.layers:
                w.packed = {name: _pack(getattr(w, name)) for name in ("qkv", "o", "gate_up", "down")}
        except RuntimeError as e:  # e.g. bf16 without AVX-512: oneDNN refuses to pack it
            log.info("not prepacking weights: %s", e)
            self.lm_head_packed = None
            for w in self.layers:
                w.packed = {}
            return False
        return True


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # The batch-size hint only picks a blocking; measured within ~10% for M = 2..256 here.
    return torch.ops.mkldnn._reorder_linear_weight(weight, 32)


def _use_packed(packed: torch.Tensor | None, x: torch.Tensor) -> bool:
    # One-row bf16/fp16 products stay on torch's gemv (`_Gemv`); everything else on the packed weight.
    return packed is not None and (x.shape[0] > 1 or x.dtype == torch.float32)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    if _use_packed(packed, x):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _linear_add(
    h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """h + linear(x, weight, bias); the residual add runs inside the matmul where it can."""
    if _use_packed(packed, x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, h, packed, bias, "add")
    if bias is None:
        return torch.addmm(h, x, weight.t())
    return h + F.linear(x, weight, bias)


class _Gemv:
    """Routes one-row weight matmuls on CPU away from oneDNN for the forward's duration.

    For a [1, K] x [K, N] bf16 product torch's own gemv streams the weights ~1.6x faster than
    oneDNN here (the whole of batch-1 decode is such products); from two rows on oneDNN wins by far,
    and the attention's small bmms must keep it. The switch is global, so `exit` always restores it
    (the forward calls it in `finally`)."""

    def __init__(self, device: torch.device) -> None:
        self.usable = device.type == "cpu" and torch.backends.mkldnn.is_available() and _mkldnn_enabled()
        self.off = False

    def enter(self, rows: int) -> None:
        if self.usable and rows == 1 and not self.off:
            torch._C._set_mkldnn_enabled(False)
            self.off = True

    def exit(self) -> None:
        if self.off:
            torch._C._set_mkldnn_enabled(True)
            self.off = False


def _mkldnn_enabled() -> bool:
    return bool(torch._C._get_mkldnn_enabled())


def _load_layer(
    src: TensorSource, cfg: ModelConfig, p: str, dtype: torch.dtype, device: torch.device
) -> LayerWeights:
    def get(name: str) -> torch.Tensor:
        return src.get(p + name, dtype, device)

    def fused(names: list[str]) -> torch.Tensor:
        return torch.cat([get(n) for n in names], dim=0)

    qkv_names = [f"self_attn.{x}_proj" for x in "qkv"]
    mlp_names = ["mlp.gate_proj", "mlp.up_proj"]
    return LayerWeights(
        input_norm=get("input_layernorm.weight"),
        qkv=fused([n + ".weight" for n in qkv_names]),
        qkv_bias=fused([n + ".bias" for n in qkv_names]) if cfg.qkv_bias else None,
        o=get("self_attn.o_proj.weight"),
        o_bias=get("self_attn.o_proj.bias") if cfg.o_bias else None,
        qk_norm=torch.cat(
            (
                get("self_attn.q_norm.weight").expand(cfg.num_heads, -1),
                get("self_attn.k_norm.weight").expand(cfg.num_kv_heads, -1),
            )
        )
        if cfg.qk_norm
        else None,
        post_norm=get("post_attention_layernorm.weight"),
        gate_up=fused([n + ".weight" for n in mlp_names]),
        gate_up_bias=fused([n + ".bias" for n in mlp_names]) if cfg.mlp_bias else None,
        down=get("mlp.down_proj.weight"),
        down_bias=get("mlp.down_proj.bias") if cfg.mlp_bias else None,
    )

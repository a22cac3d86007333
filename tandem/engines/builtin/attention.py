"""Paged attention over a flattened ("varlen") batch, and the per-step metadata it needs.

All scheduled tokens of a step run as one batch of T tokens. Each layer writes the new tokens' K/V
into their slots of the paged cache, then every request's queries attend to that request's cached
K/V, gathered through its block table:

    position p of a request  ->  block block_ids[p // block_size], offset p % block_size

    per-layer cache  [num_blocks, 2, block_size, kv_heads, head_dim]   (index 1: 0 = K, 1 = V)

Requests are ordered decodes first (one query token each, batched into one padded matmul pair),
then chunks of prompts (one SDPA call each, with a causal mask shifted by the tokens already
cached). Masks, block tables and slot indices are built once per step and shared by every layer.
Only tensor indexing and `scaled_dot_product_attention` are used, so the same code runs on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tandem.engine.executor import ScheduledRequest


@dataclass
class PrefillSeq:
    """One request with more than one query token this step."""

    q_start: int
    """Its first token's row in the flat batch."""
    q_len: int
    ctx_len: int
    """Keys it attends to: all its tokens up to and including this step's."""
    block_ids: torch.Tensor | None
    """[ceil(ctx_len / block_size)] blocks to gather keys from; None when nothing was cached before
    this step, so the fresh K/V are the whole context and a plain causal mask applies."""
    mask: torch.Tensor | None
    """[1, 1, q_len, ctx_len] bool, True = attend; None with `block_ids` None (is_causal)."""


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor
    """[T] block id of each token's KV slot."""
    slot_offsets: torch.Tensor
    """[T] offset inside that block."""
    num_decodes: int = 0
    """Rows [0, num_decodes) of the batch are single-token requests."""
    decode_block_table: torch.Tensor | None = None
    """[num_decodes, max_blocks] block ids, padded with block 0 (masked out)."""
    decode_bias: torch.Tensor | None = None
    """[num_decodes, 1, 1, max_blocks * block_size] fp32: 0 for keys < the request's length, else
    -inf (added to the scores, so padding slots get no weight)."""
    prefills: list[PrefillSeq] = field(default_factory=list)


@dataclass
class StepBatch:
    """The model inputs of one step."""

    input_ids: torch.Tensor
    """[T] token ids, decodes first, then prompt chunks, each request's tokens contiguous."""
    positions: torch.Tensor
    """[T] position of each token in its request."""
    attn: AttentionMetadata
    sample_rows: torch.Tensor
    """[S] rows whose hidden state gives logits: each sampling request's last token."""
    sample_items: list[ScheduledRequest]
    """The S requests that sample, in `sample_rows` order."""


def build_step(scheduled: Sequence[ScheduledRequest], block_size: int, device: torch.device) -> StepBatch:
    """Flatten a step's scheduled requests into model inputs (host lists, then one copy each)."""
    items = [s for s in scheduled if s.num_new_tokens > 0]
    # Stable sort: single-token requests first so they form one contiguous decode batch.
    items.sort(key=lambda s: s.num_new_tokens != 1)
    ids: list[int] = []
    pos: list[int] = []
    blocks: list[int] = []
    offsets: list[int] = []
    sample_rows: list[int] = []
    sample_items: list[ScheduledRequest] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefill_specs: list[tuple[int, int, int, list[int] | None]] = []
    for s in items:
        start, n, table = s.start, s.num_new_tokens, s.block_ids
        end = start + n
        nb = -(-end // block_size)
        assert len(table) >= nb, f"{s.request.request_id}: {len(table)} blocks for {end} tokens"
        row = len(ids)
        ids.extend(s.request.all_token_ids[start:end])
        pos.extend(range(start, end))
        blocks.extend(table[p // block_size] for p in range(start, end))
        offsets.extend(p % block_size for p in range(start, end))
        if s.samples:
            sample_rows.append(row + n - 1)
            sample_items.append(s)
        if n == 1:
            decode_tables.append(table[:nb])
            decode_lens.append(end)
        else:
            prefill_specs.append((row, n, end, table[:nb] if start > 0 else None))

    def long(x: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)

    attn = AttentionMetadata(slot_blocks=long(blocks), slot_offsets=long(offsets))
    if decode_tables:
        width = max(len(t) for t in decode_tables)
        attn.num_decodes = len(decode_tables)
        attn.decode_block_table = long([t + [0] * (width - len(t)) for t in decode_tables])
        keys = torch.arange(width * block_size, device=device)
        valid = keys[None, :] < long(decode_lens)[:, None]
        attn.decode_bias = torch.zeros(valid.shape, device=device).masked_fill(~valid, float("-inf"))[
            :, None, None, :
        ]
    for row, n, ctx, prefix_table in prefill_specs:
        mask = None
        if prefix_table is not None:
            q_pos = torch.arange(ctx - n, ctx, device=device)
            mask = (torch.arange(ctx, device=device)[None, :] <= q_pos[:, None])[None, None]
        blocks_t = long(prefix_table) if prefix_table is not None else None
        attn.prefills.append(PrefillSeq(row, n, ctx, blocks_t, mask))
    return StepBatch(long(ids), long(pos), attn, long(sample_rows), sample_items)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Store k/v in the cache, then attend. q: [T, Hq, D]; k, v: [T, Hkv, D];
    kv_cache: [num_blocks, 2, block_size, Hkv, D]. Returns [T, Hq, D]."""
    # Indices (blocks, :, offsets) select [T, 2, Hkv, D]: both K and V of each token in one write.
    kv_cache[meta.slot_blocks, :, meta.slot_offsets] = torch.stack((k, v), dim=1)
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        assert meta.decode_block_table is not None
        # Gathering K and V apart yields contiguous [nd, max_blocks, bs, Hkv, D] tensors: one copy each.
        keys = kv_cache[:, 0][meta.decode_block_table].view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        vals = kv_cache[:, 1][meta.decode_block_table].view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        assert meta.decode_bias is not None
        out[:nd] = _decode_attention(q[:nd], keys, vals, meta.decode_bias)
    for p in meta.prefills:
        rows = slice(p.q_start, p.q_start + p.q_len)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if p.block_ids is None:
            ks, vs = k[rows], v[rows]
        else:
            ks = kv_cache[:, 0][p.block_ids].view(-1, num_kv_heads, head_dim)[: p.ctx_len]  # [ctx, Hkv, D]
            vs = kv_cache[:, 1][p.block_ids].view(-1, num_kv_heads, head_dim)[: p.ctx_len]
        o = F.scaled_dot_product_attention(
            qs,
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            enable_gqa=True,
        )  # [1, Hq, L, D]
        out[rows] = o[0].transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One query per request. q: [B, Hq, D]; keys, vals: [B, Hkv, S, D]; bias: [B, 1, 1, S].

    Two batched matmuls instead of SDPA: with a single query row the fused CPU kernels gain nothing
    and run ~10x slower in bf16. The query heads sharing a KV head form its rows (GQA without
    repeating K/V); the softmax runs in fp32.
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * d**-0.5 + bias  # [B, Hkv, G, S]
    probs = scores.softmax(dim=-1).to(vals.dtype)
    return torch.matmul(probs, vals).view(b, hq, d)

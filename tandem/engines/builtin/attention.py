"""Paged attention over a flattened ("varlen") batch, and the per-step metadata it needs.

All scheduled tokens of a step run as one batch of T tokens. Each layer writes the new tokens' K/V
into their slots of the paged cache, then every request's queries attend to that request's cached
K/V, gathered through its block table:

    position p of a request  ->  block block_ids[p // block_size], offset p % block_size

    per-layer cache  [num_blocks, 2, block_size, kv_heads, head_dim]   (index 1: 0 = K, 1 = V)

Viewed as rows of Hkv * D values, a layer's cache is [num_blocks * 2 * block_size, Hkv * D], and
the K row of a slot is `block * 2 * block_size + offset` (its V row `block_size` further on): the
new tokens' K/V are written with two row copies, not an element-wise scatter.

Requests are ordered decodes first (one query token each, batched into one padded matmul pair),
then chunks of prompts (one SDPA call each, with a causal mask shifted by the tokens already
cached). Masks, block tables and slot rows are built once per step and shared by every layer.
Only tensor indexing, matmuls and `scaled_dot_product_attention` are used, so the same code runs
on CUDA.
"""

from __future__ import annotations

import functools
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
    k_rows: torch.Tensor
    """[T] row of each token's K slot in the layer cache viewed as [num_blocks * 2 * bs, Hkv * D]."""
    v_rows: torch.Tensor
    """[T] the same for V: `k_rows + block_size`."""
    num_decodes: int = 0
    """Rows [0, num_decodes) of the batch are single-token requests."""
    decode_blocks: torch.Tensor | None = None
    """[num_decodes * max_blocks] each decode's block table, padded with block 0 (masked out)."""
    decode_bias: torch.Tensor | None = None
    """[num_decodes, 1, max_blocks * block_size] in the model dtype: 0 for keys < the request's
    length, else -inf (added to the scores, so padding slots get no weight)."""
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


def build_step(
    scheduled: Sequence[ScheduledRequest],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> StepBatch:
    """Flatten a step's scheduled requests into model inputs (host lists, then one copy each).
    `dtype` is the model's: the decode bias is added to scores of that type."""
    items = [s for s in scheduled if s.num_new_tokens > 0]
    # Stable sort: single-token requests first so they form one contiguous decode batch.
    items.sort(key=lambda s: s.num_new_tokens != 1)
    rows_per_block = 2 * block_size  # K rows then V rows of one block in the [rows, Hkv * D] view
    ids: list[int] = []
    pos: list[int] = []
    k_rows: list[int] = []
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
        if s.samples:
            sample_rows.append(row + n - 1)
            sample_items.append(s)
        if n == 1:  # the common case, kept free of per-token loops
            ids.append(s.request.all_token_ids[start])
            pos.append(start)
            k_rows.append(table[start // block_size] * rows_per_block + start % block_size)
            decode_tables.append(table[:nb])
            decode_lens.append(end)
            continue
        ids.extend(s.request.all_token_ids[start:end])
        pos.extend(range(start, end))
        k_rows.extend(table[p // block_size] * rows_per_block + p % block_size for p in range(start, end))
        prefill_specs.append((row, n, end, table[:nb] if start > 0 else None))

    def long(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)

    k_rows_t = long(k_rows)
    attn = AttentionMetadata(k_rows=k_rows_t, v_rows=k_rows_t + block_size)
    if decode_tables:
        width = max(len(t) for t in decode_tables)
        flat: list[int] = []
        for t in decode_tables:
            flat.extend(t)
            flat.extend([0] * (width - len(t)))
        attn.num_decodes = len(decode_tables)
        attn.decode_blocks = long(flat)
        keys = torch.arange(width * block_size, device=device)
        pad = keys[None, None, :] >= long(decode_lens)[:, None, None]  # [nd, 1, S]
        attn.decode_bias = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill_(pad, float("-inf"))
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
    """Store k/v in the cache, then attend. q: [T, Hq, D]; k, v: [T, Hkv, D] (each [Hkv, D] row
    contiguous); kv_cache: [num_blocks, 2, block_size, Hkv, D], contiguous. Returns [T, Hq, D]."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    hd = num_kv_heads * head_dim
    rows = kv_cache.view(-1, hd)  # [num_blocks * 2 * bs, Hkv * D]
    rows.index_copy_(0, meta.k_rows, k.reshape(-1, hd))
    rows.index_copy_(0, meta.v_rows, v.reshape(-1, hd))
    nd = meta.num_decodes
    if nd:
        assert meta.decode_blocks is not None and meta.decode_bias is not None
        keys = _gather(kv_cache, 0, meta.decode_blocks).view(nd, -1, hd)  # [nd, S, Hkv * D]
        vals = _gather(kv_cache, 1, meta.decode_blocks).view(nd, -1, hd)
        dec = _decode_attention(q[:nd], keys, vals, meta.decode_bias)
        if not meta.prefills:
            return dec
    out = torch.empty_like(q)
    if nd:
        out[:nd] = dec
    for p in meta.prefills:
        span = slice(p.q_start, p.q_start + p.q_len)
        qs = q[span].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if p.block_ids is None:
            ks, vs = k[span], v[span]
        else:  # [ctx, Hkv, D]
            ks = _gather(kv_cache, 0, p.block_ids).view(-1, num_kv_heads, head_dim)[: p.ctx_len]
            vs = _gather(kv_cache, 1, p.block_ids).view(-1, num_kv_heads, head_dim)[: p.ctx_len]
        o = F.scaled_dot_product_attention(
            qs,
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            enable_gqa=True,
        )  # [1, Hq, L, D]
        out[span] = o[0].transpose(0, 1)
    return out


def _gather(kv_cache: torch.Tensor, kv: int, blocks: torch.Tensor) -> torch.Tensor:
    """K (kv=0) or V (kv=1) of `blocks` [n]: a contiguous [n, block_size, Hkv, D]. index_select
    copies whole block rows; advanced indexing on the strided K/V view goes element by element
    (~7x slower)."""
    return torch.index_select(kv_cache[:, kv], 0, blocks)


@functools.cache
def _head_mask(num_kv_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, Hkv, 1, Hkv, 1]: 1 where a query head's KV head (dim 1) meets that head's slice (dim 3)."""
    return torch.eye(num_kv_heads, dtype=dtype, device=device)[None, :, None, :, None]


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One query per request. q: [B, Hq, D]; keys, vals: [B, S, Hkv * D]; bias: [B, 1, S].
    Returns [B, Hq, D].

    GQA without moving K/V: each query head becomes a row of Hkv * D values that is zero outside
    its KV head's D-slice (block-diagonal), so one bmm against all heads' keys gives each head's
    scores, with K as gathered (a transposed operand, no copy). probs @ V then yields every head's
    output under every KV head; each query head keeps its own KV head's slice (a diagonal view).
    The products grow Hkv-fold, which is nothing next to the copies of K and V into
    [B, Hkv, S, D] that per-head batching needs. Scores are scaled and biased inside the bmm;
    softmax on reduced precision accumulates in fp32 (same bits as casting up and back).
    """
    b, hq, d = q.shape
    hkv = keys.shape[-1] // d
    g = hq // hkv
    qbd = (q.view(b, hkv, g, 1, d) * _head_mask(hkv, q.dtype, q.device)).view(b, hq, hkv * d)
    scores = torch.baddbmm(bias.to(q.dtype), qbd, keys.transpose(1, 2), alpha=d**-0.5)  # [B, Hq, S]
    probs = scores.softmax(dim=-1)
    o = torch.bmm(probs, vals).view(b, hkv, g, hkv, d)  # [B, Hkv, G, Hkv', D]: keep Hkv == Hkv'
    return o.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(b, hq, d)  # one copy

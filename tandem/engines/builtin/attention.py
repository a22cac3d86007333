"""Paged attention over a flattened ("varlen") batch, and the per-step metadata it needs.

All scheduled tokens of a step run as one batch of T tokens. Each layer writes the new tokens' K/V
into their slots of the paged cache, then every request's queries attend to that request's cached
K/V, gathered through its block table:

    position p of a request  ->  block block_ids[p // block_size], offset p % block_size

    per-layer cache  [num_blocks, 2, kv_heads, block_size, head_dim]   (index 1: 0 = K, 1 = V)

Within a block each KV head's keys are one contiguous run of block_size * head_dim values, so
gathering a request's blocks head by head ("head-block rows" of the cache viewed as
[num_blocks * 2 * kv_heads, block_size * head_dim]) yields its keys already as [kv_heads, S, D],
the layout grouped-query attention multiplies against: no transposes, no per-head copies. Viewed
as rows of D values ([num_blocks * 2 * kv_heads * block_size, D]) the new tokens' K and V are
written with two row copies, not an element-wise scatter.

Requests are ordered decodes first (one query token each, batched into one padded matmul pair),
then chunks of prompts (one SDPA call each, with a causal mask shifted by the tokens already
cached). Masks, gather indices and slot rows are built once per step and shared by every layer.
Only tensor indexing, matmuls and `scaled_dot_product_attention` are used, so the same code runs
on CUDA.
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
    key_rows: torch.Tensor | None
    """[Hkv * ceil(ctx_len / block_size)] head-block rows of its keys (its values are `kv_heads`
    rows further on), head-major; None when nothing was cached before this step, so the fresh K/V
    are the whole context and a plain causal mask applies."""
    mask: torch.Tensor | None
    """[1, 1, q_len, ctx_len] bool, True = attend; None with `key_rows` None (is_causal)."""


@dataclass
class AttentionMetadata:
    k_rows: torch.Tensor
    """[T * Hkv] row of each (token, KV head) K slot in the layer cache viewed as rows of D values."""
    v_rows: torch.Tensor
    """[T * Hkv] the same for V: `k_rows + kv_heads * block_size`."""
    num_decodes: int = 0
    """Rows [0, num_decodes) of the batch are single-token requests."""
    decode_key_rows: torch.Tensor | None = None
    """[num_decodes * Hkv * max_blocks] head-block rows of each decode's keys (request-major, then
    KV head, then block), padded with block 0 (masked out); values are `kv_heads` rows further on."""
    decode_bias: torch.Tensor | None = None
    """[num_decodes * Hkv, 1, max_blocks * block_size] in the model dtype: 0 for keys < the
    request's length, else -inf (added to the scores, so padding slots get no weight)."""
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
    num_kv_heads: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> StepBatch:
    """Flatten a step's scheduled requests into model inputs (host lists, then one copy each).
    `dtype` is the model's: the decode bias is added to scores of that type."""
    items = [s for s in scheduled if s.num_new_tokens > 0]
    # Stable sort: single-token requests first so they form one contiguous decode batch.
    items.sort(key=lambda s: s.num_new_tokens != 1)
    hkv = num_kv_heads
    rows_per_block = 2 * hkv * block_size  # K then V, head-major, in the [rows, D] view
    ids: list[int] = []
    pos: list[int] = []
    slot_rows: list[int] = []  # each token's K row for KV head 0
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
            slot_rows.append(table[start // block_size] * rows_per_block + start % block_size)
            decode_tables.append(table[:nb])
            decode_lens.append(end)
            continue
        ids.extend(s.request.all_token_ids[start:end])
        pos.extend(range(start, end))
        slot_rows.extend(table[p // block_size] * rows_per_block + p % block_size for p in range(start, end))
        prefill_specs.append((row, n, end, table[:nb] if start > 0 else None))

    def long(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)

    heads = torch.arange(hkv, device=device)
    k_rows = (long(slot_rows)[:, None] + heads * block_size).view(-1)  # [T * Hkv]
    attn = AttentionMetadata(k_rows=k_rows, v_rows=k_rows + hkv * block_size)
    if decode_tables:
        width = max(len(t) for t in decode_tables)
        flat: list[int] = []
        for t in decode_tables:
            flat.extend(t)
            flat.extend([0] * (width - len(t)))
        nd = attn.num_decodes = len(decode_tables)
        attn.decode_key_rows = _key_rows(long(flat).view(nd, 1, width), heads, hkv)
        keys = torch.arange(width * block_size, device=device)
        pad = keys[None, None, :] >= long(decode_lens)[:, None, None]  # [nd, 1, S]
        bias = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill_(pad, float("-inf"))
        attn.decode_bias = bias.repeat_interleave(hkv, dim=0)  # [nd * Hkv, 1, S]
    for row, n, ctx, prefix_table in prefill_specs:
        mask = key_rows = None
        if prefix_table is not None:
            q_pos = torch.arange(ctx - n, ctx, device=device)
            mask = (torch.arange(ctx, device=device)[None, :] <= q_pos[:, None])[None, None]
            key_rows = _key_rows(long(prefix_table).view(1, 1, -1), heads, hkv)
        attn.prefills.append(PrefillSeq(row, n, ctx, key_rows, mask))
    return StepBatch(long(ids), long(pos), attn, long(sample_rows), sample_items)


def _key_rows(blocks: torch.Tensor, heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """blocks: [R, 1, nb] -> [R * Hkv * nb] head-block rows of their keys, request-major, then head,
    then block: gathered in this order, each (request, head) is its keys as one [S, D] run."""
    return (blocks * (2 * num_kv_heads) + heads[None, :, None]).view(-1)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Store k/v in the cache, then attend. q: [T, Hq, D]; k, v: [T, Hkv, D] (each [Hkv, D] row
    contiguous); kv_cache: [num_blocks, 2, Hkv, block_size, D], contiguous. Returns [T, Hq, D]."""
    num_kv_heads, block_size, head_dim = kv_cache.shape[-3:]
    rows = kv_cache.view(-1, head_dim)  # [num_blocks * 2 * Hkv * bs, D]
    rows.index_copy_(0, meta.k_rows, k.reshape(-1, head_dim))
    rows.index_copy_(0, meta.v_rows, v.reshape(-1, head_dim))
    head_blocks = kv_cache.view(-1, block_size * head_dim)  # [num_blocks * 2 * Hkv, bs * D]
    nd = meta.num_decodes
    if nd:
        assert meta.decode_key_rows is not None and meta.decode_bias is not None
        keys = torch.index_select(head_blocks, 0, meta.decode_key_rows).view(nd * num_kv_heads, -1, head_dim)
        vals = torch.index_select(head_blocks, 0, meta.decode_key_rows + num_kv_heads)
        dec = _decode_attention(q[:nd], keys, vals.view_as(keys), meta.decode_bias)
        if not meta.prefills:
            return dec
    out = torch.empty_like(q)
    if nd:
        out[:nd] = dec
    for p in meta.prefills:
        span = slice(p.q_start, p.q_start + p.q_len)
        qs = q[span].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if p.key_rows is None:
            ks, vs = k[span].transpose(0, 1), v[span].transpose(0, 1)  # [Hkv, L, D]
        else:  # [Hkv, ctx, D]
            ks = torch.index_select(head_blocks, 0, p.key_rows).view(num_kv_heads, -1, head_dim)
            vs = torch.index_select(head_blocks, 0, p.key_rows + num_kv_heads).view_as(ks)
            ks, vs = ks[:, : p.ctx_len], vs[:, : p.ctx_len]
        o = F.scaled_dot_product_attention(
            qs,
            ks.unsqueeze(0),
            vs.unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            enable_gqa=True,
        )  # [1, Hq, L, D]
        out[span] = o[0].transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One query per request. q: [B, Hq, D]; keys, vals: [B * Hkv, S, D]; bias: [B * Hkv, 1, S].
    Returns [B, Hq, D].

    Grouped-query attention as two batched matmuls: query head i reads KV head i // G (G = Hq /
    Hkv), so q viewed as [B * Hkv, G, D] lines each KV head's G query heads up with its keys.
    Scores are scaled and biased inside the bmm; softmax on reduced precision accumulates in fp32
    (same bits as casting up and back)."""
    b, hq, d = q.shape
    g = hq // (keys.shape[0] // b)
    scores = torch.baddbmm(bias, q.reshape(-1, g, d), keys.transpose(1, 2), alpha=d**-0.5)  # [B*Hkv, G, S]
    return torch.bmm(scores.softmax(dim=-1), vals).view(b, hq, d)

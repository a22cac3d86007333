"""Paged attention against dense causal attention computed directly on each request's tokens."""

import random

import torch

from tandem.engine.executor import ScheduledRequest
from tandem.engine.request import Request, SamplingParams
from tandem.engines.builtin.attention import build_step, paged_attention

BS, HQ, HKV, D, NUM_BLOCKS = 4, 4, 2, 8, 40


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [L, Hq, D] for the last L of the S keys k, v: [S, Hkv, D]."""
    rep = HQ // HKV
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    L, S = q.shape[0], k.shape[0]
    mask = torch.arange(S)[None, :] <= torch.arange(S - L, S)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_mixed_step_matches_dense_attention() -> None:
    torch.manual_seed(0)
    cache = torch.zeros(NUM_BLOCKS, 2, HKV, BS, D)
    ids = list(range(NUM_BLOCKS))
    random.Random(1).shuffle(ids)
    # (total tokens, tokens computed before, tokens this step): a fresh prefill, a chunk over a
    # cached prefix, two decodes, and a one-token prompt.
    specs = [(10, 0, 10), (13, 6, 7), (9, 8, 1), (21, 20, 1), (1, 0, 1)]
    items, keys, values = [], [], []
    for i, (total, start, n) in enumerate(specs):
        req = Request(f"r{i}", list(range(total)), SamplingParams(), BS)
        table, ids = ids[: -(-total // BS)], ids[-(-total // BS) :]
        k, v = torch.randn(total, HKV, D), torch.randn(total, HKV, D)
        for p in range(start):  # KV from earlier steps
            cache[table[p // BS], 0, :, p % BS] = k[p]
            cache[table[p // BS], 1, :, p % BS] = v[p]
        items.append(ScheduledRequest(req, n, start, table))
        keys.append(k)
        values.append(v)
    batch = build_step(items, BS, HKV, torch.device("cpu"))
    order = sorted(range(len(items)), key=lambda i: items[i].num_new_tokens != 1)
    qs = [torch.randn(specs[i][2], HQ, D) for i in order]
    ks = torch.cat([keys[i][specs[i][1] : specs[i][0]] for i in order])
    vs = torch.cat([values[i][specs[i][1] : specs[i][0]] for i in order])
    out = paged_attention(torch.cat(qs), ks, vs, cache, batch.attn)
    row = 0
    for j, i in enumerate(order):
        total, _, n = specs[i]
        ref = _dense(qs[j], keys[i][:total], values[i][:total])
        assert torch.allclose(out[row : row + n], ref, atol=1e-5), f"request {i}"
        row += n
    assert batch.attn.num_decodes == 3
    assert batch.sample_rows.tolist() == [0, 1, 2, 12, 19]

"""Next-token sampling from a step's logits, one row per sampling request.

Contract: greedy rows (temperature 0 or top_k 1) take the argmax. Other rows divide by temperature,
keep the top_k most likely tokens and then the smallest set reaching top_p, and draw from the rest.
A request with a `seed` draws from its own `torch.Generator`, created on its first sample and kept
until `drop` is called with its id, so the same seed and prompt give the same tokens whatever else
shares the batch (a preempted request keeps its generator: its draws go on where they were). The logprob
reported is that of the chosen token under the raw logits (log_softmax before temperature and
filtering), as vLLM reports by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tandem.engine.request import SamplingParams


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, rid: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None  # the global RNG
        g = self._generators.get(rid)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self._generators[rid] = g
        return g

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[tuple[str, SamplingParams]]
    ) -> list[tuple[int, float | None]]:
        """logits: [S, vocab], row i for requests[i]. Returns (token, logprob or None) per row."""
        # Cast first: on CPU, argmax over bf16 runs ~5x slower than the cast plus an fp32 argmax.
        logits = logits.float()
        tokens = logits.argmax(dim=-1)  # [S]; overwritten below for non-greedy rows
        random_rows = [i for i, (_, sp) in enumerate(requests) if not sp.greedy]
        lp_rows = [i for i, (_, sp) in enumerate(requests) if sp.logprobs]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = _filtered_probs(logits[rows], [requests[i][1] for i in random_rows])
            for j, i in enumerate(random_rows):
                rid, sp = requests[i]
                tokens[i] = torch.multinomial(probs[j], 1, generator=self._generator(rid, sp.seed))[0]
        token_list: list[int] = tokens.tolist()
        logprobs: list[float | None] = [None] * len(requests)
        if lp_rows:
            rows = torch.tensor(lp_rows, device=logits.device)
            lp = torch.log_softmax(logits[rows], dim=-1).gather(1, tokens[rows, None])[:, 0].tolist()
            for i, value in zip(lp_rows, lp, strict=True):
                logprobs[i] = value
        return list(zip(token_list, logprobs, strict=True))


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits: [R, V] -> probabilities [R, V] after temperature, top-k and top-p."""
    temps = torch.tensor([sp.temperature for sp in params], device=logits.device)
    logits = logits / temps[:, None]
    if all(sp.top_k == 0 and sp.top_p >= 1.0 for sp in params):
        return torch.softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(vocab, device=logits.device)
    top_k = torch.tensor([sp.top_k or vocab for sp in params], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # top_p 1 keeps all: use 2 so fp rounding in the cumulative sum cannot drop a tail token.
    top_p = torch.tensor([sp.top_p if sp.top_p < 1.0 else 2.0 for sp in params], device=logits.device)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)

import pytest
import torch

from tandem.engine.request import SamplingParams
from tandem.engines.builtin.sampler import Sampler


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_logprob_is_raw_log_softmax() -> None:
    logits = _logits()
    sp = SamplingParams(temperature=0.0, logprobs=True)
    out = Sampler(torch.device("cpu"))(logits, [(f"r{i}", sp) for i in range(4)])
    expected = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(out):
        assert tok == logits[i].argmax().item()
        assert lp == pytest.approx(expected[i, tok].item(), abs=1e-6)


def test_logprob_ignores_temperature_and_is_none_unless_asked() -> None:
    logits = _logits(rows=2)
    reqs = [("a", SamplingParams(temperature=0.5, seed=1, logprobs=True)), ("b", SamplingParams(seed=2))]
    (tok, lp), (_, lp_b) = Sampler(torch.device("cpu"))(logits, reqs)
    assert lp == pytest.approx(torch.log_softmax(logits[0], -1)[tok].item(), abs=1e-6)
    assert lp_b is None


def test_seeded_draws_repeat_and_are_independent_of_batch() -> None:
    logits = _logits(rows=3)
    sp = SamplingParams(temperature=1.0, seed=42)

    def draw(rows: list[int], n: int = 20) -> list[int]:
        s = Sampler(torch.device("cpu"))
        return [s(logits[rows], [(f"r{i}", sp) for i in rows])[rows.index(0)][0] for _ in range(n)]

    alone = draw([0])
    assert alone == draw([0])
    assert alone == draw([2, 1, 0])  # other requests' draws use their own generators
    assert len(set(alone)) > 1


def test_drop_resets_the_generator() -> None:
    logits = _logits(rows=1)
    s = Sampler(torch.device("cpu"))
    sp = SamplingParams(seed=7)
    first = [s(logits, [("r", sp)])[0][0] for _ in range(10)]
    s.drop({"r"})
    assert [s(logits, [("r", sp)])[0][0] for _ in range(10)] == first


def test_top_k_and_top_p_restrict_the_choices() -> None:
    logits = _logits(rows=1, vocab=100)[0]
    top5 = set(logits.topk(5).indices.tolist())
    s = Sampler(torch.device("cpu"))
    k5 = SamplingParams(temperature=2.0, top_k=5)
    assert {s(logits[None], [("a", k5)])[0][0] for _ in range(200)} <= top5
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6)
    assert {s(logits[None], [("b", tiny_p)])[0][0] for _ in range(50)} == {logits.argmax().item()}
    # top_p 0.5 keeps the fewest tokens whose probability reaches 0.5.
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    allowed = set(order[:keep].tolist())
    half = SamplingParams(temperature=1.0, top_p=0.5)
    assert {s(logits[None], [("c", half)])[0][0] for _ in range(300)} <= allowed

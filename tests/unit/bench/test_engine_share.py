"""engine_share: the engines' means over a run from two /metrics scrapes, and the serving path's part."""

from __future__ import annotations

import pytest

from tandem.bench.engine_share import engine_share, format_share, parse


def _body(queue: tuple[float, int], prefill: tuple[float, int], itl: tuple[float, int]) -> str:
    """A frontend's /metrics with two workers, each holding half of every total."""
    lines = ["# TYPE tandem_frontend_requests counter", "tandem_frontend_requests_total 3.0"]
    names = ["request_queue_seconds", "request_prefill_seconds", "inter_token_latency_seconds"]
    for name, (total, count) in zip(names, (queue, prefill, itl), strict=True):
        lines.append(f"# TYPE tandem_worker_{name} histogram")
        for w in ("worker-0", "worker-1"):
            labels = f'model="tiny",role="agg",worker="{w}"'
            lines.append(f'tandem_worker_{name}_bucket{{{labels},le="+Inf"}} {count / 2}')
            lines.append(f"tandem_worker_{name}_count{{{labels}}} {count / 2}")
            lines.append(f"tandem_worker_{name}_sum{{{labels}}} {total / 2}")
    return "\n".join(lines) + "\n"


def test_the_difference_of_two_scrapes_gives_the_runs_means_and_the_serving_paths_part() -> None:
    before = parse(_body((1.0, 10), (2.0, 10), (3.0, 100)))
    after = parse(_body((1.0 + 0.2, 20), (2.0 + 0.5, 20), (3.0 + 0.6, 200)))  # 10 requests, 100 gaps
    report = {"ttft_ms": {"mean": 80.0}, "itl_ms": {"mean": 6.5}}
    share = engine_share(before, after, report)
    assert share is not None
    assert (share["queue_ms"], share["prefill_ms"], share["ttft_ms"]) == (20.0, 50.0, 70.0)
    assert share["itl_ms"] == pytest.approx(6.0)
    assert share["added_ttft_ms"] == 10.0 and share["added_itl_ms"] == pytest.approx(0.5)
    assert share["counts"] == {"queue": 10, "prefill": 10, "itl": 100}
    assert "TTFT +10.00 ms" in format_share(share)


def test_a_server_without_worker_phases_gives_no_share() -> None:
    assert parse("# TYPE tandem_frontend_requests counter\ntandem_frontend_requests_total 3.0\n") is None
    assert engine_share(None, None, {"ttft_ms": {"mean": 1.0}, "itl_ms": {"mean": 1.0}}) is None


def test_no_requests_between_the_scrapes_gives_no_means() -> None:
    body = _body((1.0, 10), (2.0, 10), (3.0, 100))
    share = engine_share(parse(body), parse(body), {"ttft_ms": {"mean": None}, "itl_ms": {"mean": None}})
    assert share is not None and share["ttft_ms"] is None and share["added_ttft_ms"] is None
    assert "TTFT - ms" in format_share(share)

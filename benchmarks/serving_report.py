"""The tables of benchmarks/serving_vs_dynamo.py: each point's summary line, the side-by-side table
with Tandem's ratios over each Dynamo row, and (speed-up 1, several rounds) the round-by-round
differences, and (`--pool`) the percentiles of every round's requests taken together. A row named
`NAME#TAG` is compared with the untagged Dynamo rows like a Tandem row."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from tandem.bench.report import percentile


def median_result(runs: list[Any]) -> Any:
    """Field by field median of repeated runs of one point (numbers only; other fields from the first)."""
    first = runs[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict)):
        return first
    if isinstance(first, dict):
        return {k: median_result([r[k] for r in runs if isinstance(r, dict) and k in r]) for k in first}
    return statistics.median(runs)


def summary(r: dict) -> str:
    t, i = r["ttft_ms"], r["itl_ms"]
    return (
        f"{r['req_per_s']:8.1f} req/s {r['out_tok_per_s']:9.0f} tok/s  TTFT p50 {t['p50']:8.2f} "
        f"p99 {t['p99']:8.2f}  ITL p50 {i['p50']:6.2f} p99 {i['p99']:6.2f} ms  chunks "
        f"{r['chunks_per_req_mean']}  fe {frontend_cpu_ms_per_token(r) * 1e3:5.1f} us/tok  "
        f"stack {stack_cpu_ms_per_request(r):5.2f} ms/req  others {r['other_procs_cpu_pct_of_one_core']:.0f}%"
    )


def frontend_cpu_ms_per_token(r: dict) -> float:
    """CPU of the frontend process (all of them, with `--frontends N`) per output token."""
    pct = sum(v for k, v in r["cpu_pct_of_one_core"].items() if k == "frontend" or "_fe" in k)
    return pct / 100.0 / max(r["out_tok_per_s"], 1e-9) * 1e3


def stack_cpu_ms_per_request(r: dict) -> float:
    """CPU of every server process (frontend, workers / mocker) per completed request."""
    pct = sum(v for k, v in r["cpu_pct_of_one_core"].items() if k != "client")
    return pct / 100.0 / max(r["req_per_s"], 1e-9) * 1e3


def point_key(system: str, speedup: float, c: int) -> str:
    """Where a point's results are kept (in `runs`, the medians and the JSON)."""
    return f"{system}|{speedup:g}|{c}"


def field_label(key: str, p: str) -> str:
    """ "ttft_ms", "p50" -> "TTFT p50"."""
    return f"{key[:4].upper().rstrip('_')} {p}"


def tandem_dynamo_pairs(systems: list[str]) -> list[tuple[str, str]]:
    """Every Tandem row, and every tagged Dynamo row (an A/A twin), with every untagged Dynamo row,
    in the order given."""
    dynamos = [s for s in systems if s.startswith("dynamo") and "#" not in s]
    tried = [s for s in systems if s not in dynamos]
    return [(t, d) for t in tried for d in dynamos]


def prefill_ms(tokens: float) -> float:
    return 4.209989e-7 * tokens * tokens + 1.518344e-2 * tokens + 16.50142


def table(results: dict[str, Any], systems: list[str], speedups: list[float], cs: list[int]) -> str:
    """Side-by-side rows, then Tandem's ratios over each Dynamo row (rates: > 1 is Tandem better;
    added latency and CPU: smaller is Tandem better)."""
    lines = []
    for sp in speedups:
        lines.append(f"\n## speed-up {sp:g}")
        head = f"{'system':16s}{'c':>4s}{'req/s':>9s}{'tok/s':>9s}{'TTFT50':>9s}{'TTFT99':>9s}{'ITL50':>8s}"
        head += (
            f"{'ITL99':>8s}{'chunks':>7s}{'feCPU%':>8s}{'feus/tok':>9s}{'stackms/req':>12s}{'others%':>8s}"
        )
        lines.append(head)
        for c in cs:
            for s in systems:
                r = results.get(point_key(s, sp, c))
                if r is None:
                    continue
                t, i = r["ttft_ms"], r["itl_ms"]
                fe = r["cpu_pct_of_one_core"].get("frontend", 0.0)
                lines.append(
                    f"{s:16s}{c:4d}{r['req_per_s']:9.1f}{r['out_tok_per_s']:9.0f}{t['p50']:9.2f}"
                    f"{t['p99']:9.2f}{i['p50']:8.2f}{i['p99']:8.2f}{r['chunks_per_req_mean']:7.1f}{fe:8.1f}"
                    f"{frontend_cpu_ms_per_token(r) * 1e3:9.1f}{stack_cpu_ms_per_request(r):12.2f}"
                    f"{r['other_procs_cpu_pct_of_one_core']:8.0f}"
                )
            for ts, ds in tandem_dynamo_pairs(systems):
                a, b = results.get(point_key(ts, sp, c)), results.get(point_key(ds, sp, c))
                if a is not None and b is not None:
                    lines.append(f"  {ts} / {ds}: " + ratios(a, b, sp))
    return "\n".join(lines)


def ratios(a: dict, b: dict, speedup: float) -> str:
    cpu = stack_cpu_ms_per_request(a) / max(stack_cpu_ms_per_request(b), 1e-9)
    fe = frontend_cpu_ms_per_token(a) / max(frontend_cpu_ms_per_token(b), 1e-9)
    if speedup != 1:
        rps, tps = a["req_per_s"] / b["req_per_s"], a["out_tok_per_s"] / b["out_tok_per_s"]
        return (
            f"req/s x{rps:.2f}, tok/s x{tps:.2f}, frontend CPU/token x{fe:.2f}, stack CPU/request x{cpu:.2f}"
        )
    # Added latency = measured - the engine's own time for one request alone (the same model for both).
    floor_ttft = prefill_ms(a.get("server_prompt_tokens_p50") or 100)
    floor_itl = 5.74
    parts = []
    for key, floor in (("ttft_ms", floor_ttft), ("itl_ms", floor_itl)):
        for p in ("p50", "p99"):
            da, db = a[key][p] - floor, b[key][p] - floor
            parts.append(f"{field_label(key, p)} added {da:+.2f} vs {db:+.2f} ms")
    return "; ".join(parts) + f"; frontend CPU/token x{fe:.2f}"


def paired(runs: dict[str, list[Any]], systems: list[str], cs: list[int]) -> str:
    """Realistic timing, round by round: each round runs every system back to back, so the difference
    of one round is measured on the same state of a noisy machine. Per latency field, the median of
    those differences (Tandem - Dynamo, ms; negative is Tandem ahead), in how many rounds Tandem was
    at or under Dynamo, and the smallest and largest difference."""
    lines = []
    for ts, ds in tandem_dynamo_pairs(systems):
        for c in cs:
            a, b = runs.get(point_key(ts, 1, c)), runs.get(point_key(ds, 1, c))
            if not a or not b:
                continue
            parts = []
            for key, p in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99")):
                d = [x[key][p] - y[key][p] for x, y in zip(a, b, strict=True)]
                ahead = sum(1 for v in d if v <= 0)
                parts.append(
                    f"{field_label(key, p)} {statistics.median(d):+.2f} "
                    f"({ahead}/{len(d)} at or under, {min(d):+.2f}..{max(d):+.2f})"
                )
            lines.append(f"  c={c} {ts} - {ds}: " + "; ".join(parts))
    if not lines:
        return ""
    return "\n## speed-up 1, round by round (Tandem - Dynamo, ms)\n" + "\n".join(lines)


POOLED = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99"))


BOOTSTRAP_SAMPLES = 1000


def round_interval(
    a: list[list[float]], b: list[list[float]], q: float, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The 5th..95th percentile of the pooled q-th percentile difference (a - b) when whole rounds
    are drawn again with replacement: rounds, not requests, are the independent draws (each round
    starts fresh deployments, and a deployment keeps the batching regime it falls into for the
    whole round). Rounds are drawn in pairs (round i of a with round i of b, which ran side by side)
    when both have as many; otherwise each side on its own."""
    rng = np.random.default_rng(seed)
    ra = [np.asarray(r, dtype=float) for r in a]
    rb = [np.asarray(r, dtype=float) for r in b]
    paired = len(ra) == len(rb)
    diffs = np.empty(samples)
    for i in range(samples):
        ia = rng.integers(0, len(ra), len(ra))
        ib = ia if paired else rng.integers(0, len(rb), len(rb))
        pa = np.percentile(np.concatenate([ra[j] for j in ia]), q)
        pb = np.percentile(np.concatenate([rb[j] for j in ib]), q)
        diffs[i] = pa - pb
    lo, hi = np.percentile(diffs, [5.0, 95.0])
    return float(lo), float(hi)


def pooled(raws: dict[str, list[Any]], systems: list[str], speedups: list[float], cs: list[int]) -> str:
    """Each pair's percentiles over all its rounds' requests at once: `raws[point_key]` holds one
    {"ttft_ms": [...], "itl_ms": [...]} per round. A round's p99 of a few hundred requests is its few
    slowest; pooled, the p99 rests on every round's tail (rounds alternate the order of the systems,
    so a machine that drifts weighs on each side alike). Tandem's value, Dynamo's, the difference,
    and with several rounds the difference's 90% interval when rounds are drawn again
    (`round_interval`): an interval that straddles 0 is no verdict either way."""
    lines = []
    for sp in speedups:
        for ts, ds in tandem_dynamo_pairs(systems):
            for c in cs:
                a, b = raws.get(point_key(ts, sp, c)), raws.get(point_key(ds, sp, c))
                if not a or not b:
                    continue
                every = {
                    k: ([x for r in a for x in r[k]], [x for r in b for x in r[k]])
                    for k in ("ttft_ms", "itl_ms")
                }
                parts = []
                for key, p in POOLED:
                    va, vb = (percentile(xs, float(p[1:])) for xs in every[key])
                    if va is None or vb is None:
                        continue
                    part = f"{field_label(key, p)} {va:.2f} vs {vb:.2f} ({va - vb:+.2f})"
                    if min(len(a), len(b)) > 1:
                        lo, hi = round_interval([r[key] for r in a], [r[key] for r in b], float(p[1:]))
                        part += f" [{lo:+.2f}..{hi:+.2f}]"
                    parts.append(part)
                na, nb = (len(xs) for xs in every["ttft_ms"])
                lines.append(f"  x{sp:g} c={c} {ts} ({na}) - {ds} ({nb}): " + "; ".join(parts))
    if not lines:
        return ""
    head = (
        "\n## every round's requests pooled (row vs Dynamo, ms; requests in brackets; [90% interval of the "
        "difference with rounds drawn again])\n"
    )
    return head + "\n".join(lines)

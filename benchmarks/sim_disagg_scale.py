"""Benchmark 3 of "Disaggregated prefill/decode": 8 simulated H100s serving Llama-3-70B (FP8),
aggregated vs every prefill/decode split vs conditional disaggregation, by goodput per GPU.

    python benchmarks/sim_disagg_scale.py                                # Azure conv lengths, 2 seeds
    python benchmarks/sim_disagg_scale.py --workload long --seeds 0      # ISL 3k-8k, OSL 150-300
    python benchmarks/sim_disagg_scale.py --combine sum --link-gbps 12.5 --out x.json

`--tp 2` makes every engine two GPUs (tensor parallel), so 8 GPUs are 4 engines (1P3D..3P1D).

Goodput (DistServe): the highest Poisson rate at which >= 90% of requests meet TTFT <= 2 s and
TPOT <= 50 ms (`tandem.sim.goodput`), per seed, then averaged over seeds. Every engine is one GPU
timed by `tandem.engines.sim.profiles.llama3_70b_h100_fp8` (roofline; `--combine` picks how mixed
chunked-prefill steps are costed). Prefill engines batch up to 8,192 tokens a step; aggregated
engines are tuned over `--budgets`; decode engines of a conditional split prefill short prompts in
512-token chunks. Conditional disaggregation runs on the best split and on one fewer prefill GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.engine.config import EngineConfig
from tandem.engines.sim.profiles import RooflineTiming, llama3_70b_h100_fp8
from tandem.router.disagg import DisaggPolicy
from tandem.sim.goodput import PoissonWorkload, Slo, azure_lengths, find_goodput, uniform_lengths
from tandem.sim.pd_fleet import PDFleet, PDFleetConfig

BLOCK_SIZE = 16
PREFILL_BUDGET = 8192
LOCAL_PREFILL_BUDGET = 512


@dataclass(frozen=True)
class Case:
    name: str
    num_prefill: int
    num_decode: int
    budget: int
    """Token budget of the decode (or aggregated) engines."""
    threshold: int = 0
    """Prompts shorter than this prefill on a decode engine (0: every prompt goes remote)."""


def fleet_config(case: Case, timing: RooflineTiming, link_gbps: float) -> PDFleetConfig:
    def engine(budget: int) -> EngineConfig:
        return EngineConfig(
            block_size=BLOCK_SIZE,
            num_blocks=timing.num_blocks(BLOCK_SIZE),
            max_num_seqs=256,
            max_num_batched_tokens=budget,
            max_model_len=32768,
        )

    return PDFleetConfig(
        case.num_prefill,
        case.num_decode,
        engine(PREFILL_BUDGET),
        engine(case.budget),
        timing,
        timing.kv_bytes_per_token,
        link_bytes_per_s=link_gbps * 1e9,
        policy=DisaggPolicy(min_remote_prompt_tokens=case.threshold),
    )


def lengths(workload: str) -> list[tuple[int, int]]:
    if workload == "azure":
        return azure_lengths()
    return uniform_lengths((3000, 8000), (150, 300))


def run_case(args: tuple[Case, str, int, int, str, float, int]) -> dict[str, Any]:
    case, workload, seed, num_requests, combine, link_gbps, tp = args
    timing = llama3_70b_h100_fp8(combine=combine, tp=tp)
    cfg = fleet_config(case, timing, link_gbps)
    wl = PoissonWorkload(lengths(workload), num_requests, seed)
    start = 8.0 if workload == "azure" else 1.5
    result = find_goodput(lambda rate: PDFleet(cfg).run(wl(rate)), Slo(), start)
    out = result.summary()
    out.update(case=case.name, seed=seed, gpus=(case.num_prefill + case.num_decode) * tp)
    return out


def run_cases(cases: list[Case], a: argparse.Namespace) -> list[dict[str, Any]]:
    """Goodput of each case averaged over seeds (latencies from the first seed's goodput run)."""
    jobs = [(c, a.workload, s, a.requests, a.combine, a.link_gbps, a.tp) for c in cases for s in a.seeds]
    with ProcessPoolExecutor(a.jobs) as pool:
        runs = list(pool.map(run_case, jobs))
    rows = []
    for c in cases:
        mine = [r for r in runs if r["case"] == c.name]
        row = dict(mine[0])
        row["goodput"] = float(np.mean([r["goodput"] for r in mine]))
        row["goodput_per_seed"] = [r["goodput"] for r in mine]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], best_agg: float) -> str:
    head = (
        "| config | goodput req/s | per GPU | vs best agg | TTFT p90 ms | TPOT p90 ms | ITL p99 ms |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        g = r["goodput"]
        lines.append(
            f"| {r['case']} | {g:.2f} | {g / r['gpus']:.2f} | {g / best_agg:.2f}x | "
            f"{r.get('ttft_p90_ms', float('nan')):.0f} | {r.get('tpot_p90_ms', float('nan')):.1f} | "
            f"{r.get('itl_p99_ms', float('nan')):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["azure", "long"], default="azure")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--requests", type=int, default=1500, help="requests per run")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="GPUs per engine (tensor parallel)")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 2048, 8192])
    p.add_argument("--thresholds", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--combine", choices=["max", "sum"], default="max")
    p.add_argument("--link-gbps", type=float, default=50.0, help="prefill->decode GB/s")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", help="write every row as JSON here")
    a = p.parse_args(argv)

    n = a.gpus // a.tp  # engines
    if n < 2:
        p.error("need at least two engines (gpus / tp >= 2)")
    tp = f" TP{a.tp}" if a.tp > 1 else ""
    agg = [Case(f"agg {n}x{tp}, budget {b}", 0, n, b) for b in a.budgets]
    splits = [Case(f"{k}P{n - k}D{tp}", k, n - k, 2048) for k in range(1, n)]
    rows = run_cases(agg + splits, a)
    best_agg = max(r["goodput"] for r in rows[: len(agg)])
    best = max(rows[len(agg) :], key=lambda r: r["goodput"])
    k = int(best["case"].split("P")[0])
    cond = [
        Case(f"{kk}P{n - kk}D{tp} cond <{t}", kk, n - kk, LOCAL_PREFILL_BUDGET, t)
        for kk in sorted({k, max(1, k - 1)})
        for t in a.thresholds
    ]
    rows += run_cases(cond, a)
    print(
        f"workload={a.workload} seeds={a.seeds} requests/run={a.requests} combine={a.combine} "
        f"link={a.link_gbps} GB/s gpus={a.gpus} tp={a.tp}"
    )
    print(table(rows, best_agg))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a decode step of Tandem's built-in engine spends its time, at one batch size.

B requests with `--context`-token prompts decode together; after a warm-up, each engine step is
split into its phases (schedule, build_step, forward, sampler, update) by wrapping those calls, and
one torch.profiler pass groups the forward's aten ops into matmuls, KV-cache gather/write,
softmax and the rest. A "matmul floor" runs only the step's weight matmuls on the same shapes: the
gap between it and the forward is what the rest of the layer costs (attention, norms, RoPE and the
per-op dispatch of ~100 small ops a layer).

    .venv/bin/python benchmarks/profile_engine.py --batch 1
    .venv/bin/python benchmarks/profile_engine.py --batch 32 --trace /tmp/b32.json   # chrome trace
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import TandemRunner
from engine_protocol import Workload, prompt_sets

import tandem.engines.builtin.executor as executor_module
from tandem.engine.request import SamplingParams

OP_GROUPS = {
    "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "KV write (index_put)": ("aten::index_put_", "aten::_index_put_impl_"),
    "KV gather (index)": ("aten::index",),
    "copies (copy_, cat, stack)": ("aten::copy_", "aten::cat", "aten::stack", "aten::clone"),
    "softmax": ("aten::_softmax", "aten::softmax"),
    "argmax (sampler)": ("aten::argmax",),
}


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - t0)

        return timed

    def median_ms(self, name: str) -> float:
        return statistics.median(self.seconds[name]) * 1e3


class TimedSampler:
    """The executor's sampler with its calls timed (an instance's `__call__` cannot be patched)."""

    def __init__(self, inner: Any, timed_call: Callable[..., Any]) -> None:
        self.inner = inner
        self.timed_call = timed_call

    def __call__(self, *args: Any) -> Any:
        return self.timed_call(*args)

    def drop(self, request_ids: Any) -> None:
        self.inner.drop(request_ids)


def matmul_floor_ms(model: Any, batch: int, repeats: int = 20) -> float:
    """Median time of only the step's weight matmuls (every layer's, then the lm_head) for `batch`
    query rows: what a step would cost if everything else were free."""
    matrices = [m for w in model.layers for m in (w.qkv, w.o, w.gate_up, w.down)] + [model.lm_head]
    # One input per width: qkv, gate_up and lm_head take hidden, o takes Hq*D, down intermediate.
    inputs = {m.shape[1]: torch.randn(batch, m.shape[1], dtype=m.dtype) for m in matrices}
    times = []
    # Like the model's forward: one-row products skip oneDNN (torch's gemv is faster there).
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=batch > 1):
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            for m in matrices:
                F.linear(inputs[m.shape[1]], m)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens of each request")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace", type=Path, default=None, help="write a chrome trace of the profiled steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from tandem.models.smollm2 import convert_smollm2

        args.model = convert_smollm2()

    w = Workload(batches=(args.batch,), prompt_len=args.context, output_len=2 * args.steps + 8, repeats=1)
    runner = TandemRunner(args.model, w)
    core, ex = runner.core, runner.executor
    prompts = prompt_sets(w)[f"warm-b{args.batch}"]
    runner.generate(prompts, 4)

    timer = PhaseTimer()
    core.scheduler.schedule = timer.wrap("schedule", core.scheduler.schedule)  # type: ignore[method-assign]
    core.scheduler.update = timer.wrap("update", core.scheduler.update)  # type: ignore[method-assign]
    ex.model.forward = timer.wrap("forward", ex.model.forward)  # type: ignore[method-assign]
    ex.sampler = TimedSampler(ex.sampler, timer.wrap("sampler", ex.sampler))  # type: ignore[assignment]
    executor_module.build_step = timer.wrap("build_step", executor_module.build_step)  # type: ignore[attr-defined]

    sp = SamplingParams(max_tokens=w.output_len, temperature=0.0, ignore_eos=True)
    for p in prompts:
        core.add_request(p, sp)
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    timer.seconds.clear()
    step_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        core.step()
        step_times.append(time.perf_counter() - t0)
    step_ms = statistics.median(step_times) * 1e3

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps // 2):
            core.step()
    while core.has_unfinished():
        core.step()
    if args.trace:
        prof.export_chrome_trace(str(args.trace))

    n = args.steps // 2
    grouped: dict[str, float] = defaultdict(float)
    calls = 0
    total_self = 0.0
    for e in prof.key_averages():
        self_ms = e.self_cpu_time_total / 1e3 / n
        total_self += self_ms
        calls += e.count
        group = next((g for g, names in OP_GROUPS.items() if e.key in names), "other ops")
        grouped[group] += self_ms

    floor = matmul_floor_ms(ex.model, args.batch)
    print(f"batch {args.batch}, context {args.context}+, {args.threads} threads, {args.steps} steps")
    print(f"step: {step_ms:.2f} ms median = {args.batch / step_ms * 1e3:.1f} tok/s")
    print("\n| phase | ms / step | share |\n| --- | --- | --- |")
    phases = ["schedule", "build_step", "forward", "sampler", "update"]
    for name in phases:
        ms = timer.median_ms(name)
        print(f"| {name} | {ms:.2f} | {ms / step_ms:.0%} |")
    rest = step_ms - sum(timer.median_ms(p) for p in phases)
    print(f"| rest of step | {rest:.2f} | {rest / step_ms:.0%} |")
    print(f"\nmatmul floor (weight matmuls alone, same shapes): {floor:.2f} ms")
    print(f"forward minus floor: {timer.median_ms('forward') - floor:.2f} ms")
    print(
        f"\nprofiled ops: {calls / n:.0f} aten calls a step "
        f"({calls / n / len(ex.model.layers):.0f} a layer); self time by group (profiler on, inflated):"
    )
    print("\n| op group | ms / step | share of op time |\n| --- | --- | --- |")
    for group, ms in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {ms:.2f} | {ms / total_self:.0%} |")
    print("\ntop ops by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

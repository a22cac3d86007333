"""Engine throughput on this machine: Tandem's built-in engine, transformers `generate` and vLLM CPU.

SmolLM2-135M-Instruct in bf16, greedy, EOS ignored. Decode tok/s at batch 1, 8 and 32 (128-token
prompts, 128 output tokens; prefill time subtracted, see `engine_protocol.py`) and prefill tok/s
(16 prompts x 128 tokens in one batch). Tandem and transformers run in this process; vLLM runs in a
subprocess of its own venv (`--vllm-python`, skipped if absent). The roofline of batch-1 decode is
the measured memory read bandwidth over the bf16 weight bytes one step reads.

    .venv/bin/python benchmarks/bench_engine.py --vllm-python ~/.cache/tandem/vllm-venv/bin/python

Prints a markdown table; `--json PATH` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_protocol import (
    Workload,
    check_lengths,
    measure,
    prompt_sets,
    workload_to_dict,
)

DEFAULT_VLLM_PYTHON = Path.home() / ".cache" / "tandem" / "vllm-venv" / "bin" / "python"
TARGET_B32_VS_VLLM = 1.5
TARGET_B1_VS_ROOFLINE = 0.70


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 9) -> tuple[float, float]:
    """Memory read bandwidth in GB/s (median, best): time to sum a `gib` GiB buffer, far larger
    than the caches.

    The buffer holds random bf16 values: a constant-filled one measured 77 GB/s here once, far
    above any other reading (identical pages can be merged by the host, so reads hit cache). It is
    summed through a float32 view (the same bytes, half the elements) to keep the reduction cheap
    next to the memory traffic on two cores."""
    n = int(gib * 2**30)
    f = torch.randn(n // 2, dtype=torch.bfloat16).view(torch.float32)
    f.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f.sum()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times) / 1e9, n / min(times) / 1e9


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from the headers of the folder's safetensors files (no data read)."""
    shapes: dict[str, tuple[list[int], str]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = (meta["shape"], meta["dtype"])
    return shapes


def weight_bytes_per_decode_step(model_dir: Path, bytes_per_param: int = 2) -> int:
    """bf16 bytes of weights one decode step reads: every layer, the final norm and the lm_head.

    The embedding table is only indexed (B rows), so it counts once, as the lm_head, when tied;
    an untied checkpoint counts its lm_head and not its embedding."""
    total = embed = 0
    has_lm_head = False
    for name, (shape, _) in safetensors_shapes(model_dir).items():
        numel = 1
        for d in shape:
            numel *= d
        if name.endswith("embed_tokens.weight"):
            embed = numel
            continue
        has_lm_head |= name.endswith("lm_head.weight")
        total += numel
    if not has_lm_head:
        total += embed  # tied: the embedding matrix is read once per step as the lm_head
    return total * bytes_per_param


class TandemRunner:
    """EngineCore over BuiltinExecutor, driven step by step (no tokenizer, no detokenization)."""

    def __init__(self, model_dir: Path, w: Workload, dtype: str = "bfloat16") -> None:
        from tandem.engine.config import EngineConfig
        from tandem.engine.core import EngineCore
        from tandem.engines.builtin.executor import BuiltinExecutor

        config = EngineConfig(
            enable_prefix_caching=False,
            max_num_seqs=max(max(w.batches), w.prefill_batch),
            max_num_batched_tokens=max(2048, w.prefill_tokens),
            max_model_len=w.prompt_len + w.output_len + 16,
        )
        self.executor = BuiltinExecutor(model_dir, config, dtype=dtype)
        self.core = EngineCore(config, self.executor)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        from tandem.engine.request import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        reqs = [self.core.add_request(p, sp) for p in prompts]
        while self.core.has_unfinished():
            self.core.step()
        check_lengths([r.num_output_tokens for r in reqs], max_tokens)


class TransformersRunner:
    """`generate` on the same checkpoint, bf16, greedy, left-padded batch (the prompts are equal in
    length here, so padding is a no-op), EOS held off with min_new_tokens."""

    def __init__(self, model_dir: Path, dtype: str = "bfloat16") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.pad_id = self.model.generation_config.pad_token_id or 0

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        check_lengths([out.shape[1] - width] * len(prompts), max_tokens)


def run_vllm(python: Path, model_dir: Path, w: Workload, timeout_s: float, dtype: str) -> dict | str:
    """The vLLM numbers, or why there are none."""
    if not python.exists():
        return f"not installed ({python} absent)"
    script = Path(__file__).resolve().parent / "vllm_cpu_bench.py"
    cmd = [str(python), str(script), "--model", str(model_dir), "--workload", json.dumps(workload_to_dict(w))]
    cmd += ["--dtype", dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f}s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return f"failed (exit {proc.returncode}): " + " | ".join(tail)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def render_table(w: Workload, results: dict[str, dict | str], roofline_b1: float) -> tuple[str, list[str]]:
    """The markdown table, and a verdict line per target."""
    nums = {k: v for k, v in results.items() if isinstance(v, dict)}

    def get(engine: str, key: str) -> float | None:
        return nums.get(engine, {}).get(key)

    columns = ["tok/s", "tandem", "transformers", "vllm-cpu", "roofline"]
    columns += ["tandem/vllm", "tandem/transformers", "tandem/roofline"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    rows = [(f"decode, batch {b}", f"decode_b{b}") for b in w.batches]
    rows.append((f"prefill, {w.prefill_batch} x {w.prompt_len} tokens", "prefill"))
    for label, key in rows:
        t, h, v = get("tandem", key), get("transformers", key), get("vllm", key)
        roof = roofline_b1 if key == "decode_b1" else None
        cells = [label, _fmt(t), _fmt(h), _fmt(v), _fmt(roof), _ratio(t, v), _ratio(t, h), _ratio(t, roof)]
        lines.append("| " + " | ".join(cells) + " |")
    verdicts = []
    t32, v32 = get("tandem", "decode_b32"), get("vllm", "decode_b32")
    if t32 is not None and v32:
        r = t32 / v32
        gap = (
            "met"
            if r >= TARGET_B32_VS_VLLM
            else f"missed: needs {TARGET_B32_VS_VLLM * v32 - t32:.0f} tok/s more"
        )
        verdicts.append(f"batch 32 >= {TARGET_B32_VS_VLLM}x vllm-cpu: {r:.2f}x, {gap}")
    t1 = get("tandem", "decode_b1")
    if t1 is not None:
        r = t1 / roofline_b1
        gap = (
            "met"
            if r >= TARGET_B1_VS_ROOFLINE
            else f"missed: needs {TARGET_B1_VS_ROOFLINE * roofline_b1 - t1:.1f} tok/s more"
        )
        verdicts.append(f"batch 1 >= {TARGET_B1_VS_ROOFLINE:.0%} of roofline: {r:.0%}, {gap}")
    return "\n".join(lines), verdicts


def _cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def wait_for_quiet(timeout_s: float, below: float = 0.5) -> float:
    """Wait for other work to leave the cores: with two cores, one busy process elsewhere can stall
    every OpenMP barrier of a two-thread engine (see docs/benchmarks.md). Returns seconds waited."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - t0 < timeout_s:
        time.sleep(5)
    return time.monotonic() - t0


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tandem"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: SmolLM2-135M)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="tandem,transformers,vllm")
    ap.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    ap.add_argument("--vllm-timeout", type=float, default=1800.0)
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="the dtype every engine is asked for (default: bfloat16)",
    )
    ap.add_argument("--vllm-dtype", default=None, choices=["bfloat16", "float32"], help="default: --dtype")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the 1-min load average to drop below 0.5 first",
    )
    args = ap.parse_args()
    waited = wait_for_quiet(args.wait_quiet)

    torch.set_num_threads(args.threads)
    if args.model is None:
        from tandem.models.smollm2 import convert_smollm2

        args.model = convert_smollm2()
    w = Workload(
        batches=tuple(int(b) for b in args.batches.split(",")),
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        prefill_batch=args.prefill_batch,
        repeats=args.repeats,
    )
    engines = args.engines.split(",")
    load_before = os.getloadavg()
    bandwidth, best_bandwidth = read_bandwidth_gbs()
    weight_bytes = weight_bytes_per_decode_step(args.model)
    roofline_b1 = bandwidth * 1e9 / weight_bytes
    sets = prompt_sets(w)

    results: dict[str, dict | str] = {}
    vllm_dtype = args.vllm_dtype or args.dtype
    notes: list[str] = [f"vllm-cpu dtype {vllm_dtype}"]
    # vLLM first, alone: its engine process and this one's threads would otherwise share two cores.
    if "vllm" in engines:
        print("vllm-cpu ...", file=sys.stderr, flush=True)
        results["vllm"] = run_vllm(args.vllm_python, args.model, w, args.vllm_timeout, vllm_dtype)
    if "tandem" in engines:
        print("tandem ...", file=sys.stderr, flush=True)
        tandem = TandemRunner(args.model, w, args.dtype)
        results["tandem"] = measure(tandem.generate, w, sets)
        ran = str(tandem.executor.dtype).removeprefix("torch.")
        notes.append(f"tandem asked for {args.dtype}, computed in {ran}")
        del tandem
    if "transformers" in engines:
        print("transformers ...", file=sys.stderr, flush=True)
        hf = TransformersRunner(args.model, args.dtype)
        results["transformers"] = measure(hf.generate, w, sets)
        del hf
    load_after = os.getloadavg()

    table, verdicts = render_table(w, results, roofline_b1)
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, "
        f"torch threads {args.threads}, torch {torch.__version__}"
    )
    print(
        f"date: {datetime.date.today().isoformat()}; tandem commit {_git_rev()}; "
        f"1-min load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f} "
        f"(waited {waited:.0f}s for quiet)"
    )
    print(
        f"roofline: {bandwidth:.1f} GB/s read bandwidth (median; best {best_bandwidth:.1f}) / "
        f"{weight_bytes / 1e6:.1f} MB bf16 weights a step = {roofline_b1:.1f} tok/s at batch 1"
    )
    print("; ".join(notes))
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name}: {r}")
    print()
    print(table)
    print()
    for v in verdicts:
        print(f"- {v}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "workload": workload_to_dict(w),
                    "bandwidth_gbs": bandwidth,
                    "best_bandwidth_gbs": best_bandwidth,
                    "weight_bytes": weight_bytes,
                    "roofline_b1": roofline_b1,
                    "load_before": load_before,
                    "load_after": load_after,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

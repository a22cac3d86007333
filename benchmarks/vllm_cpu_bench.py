"""vLLM CPU on the `bench_engine.py` protocol; run by the python of vLLM's own venv (see
docs/benchmarks.md for the set-up), usually as a subprocess of `bench_engine.py`:

    ~/.cache/tandem/vllm-venv/bin/python benchmarks/vllm_cpu_bench.py --model DIR \
        --workload '{"batches": [1, 8, 32], "prompt_len": 128, ...}'

Prints one line `RESULT {json}` with the same keys as `engine_protocol.measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# engine_protocol is imported by path: this script runs in vLLM's venv, where tandem is not installed.
from engine_protocol import (
    Workload,
    check_lengths,
    measure,
    prompt_sets,
    workload_from_dict,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default="{}", help="JSON of engine_protocol.Workload fields")
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    w = workload_from_dict(json.loads(args.workload)) if args.workload != "{}" else Workload()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=w.prompt_len + w.output_len + 16,
        max_num_seqs=max(max(w.batches), w.prefill_batch),
        enable_prefix_caching=False,
        seed=w.seed,
    )

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        check_lengths([len(o.outputs[0].token_ids) for o in outs], max_tokens)

    result = measure(generate, w, prompt_sets(w))
    result["version"] = vllm.__version__  # type: ignore[assignment]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

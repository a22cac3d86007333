"""The referee client (../shared/bench/referee_loadgen.py), run unchanged, that also writes every
measured request's TTFT and ITL, so the rounds of a run can be pooled into one distribution:

    python benchmarks/referee_raw.py RAW.json --url http://127.0.0.1:8765 --model tiny ... (referee flags)

A p99 over one round of a few hundred requests is its few slowest requests, and moves by milliseconds
from round to round on this machine (the A/A rows in docs/benchmarks.md); the same percentile over
every round's requests together rests on ten times as many. The referee's own file (`--out`) is
written as always; RAW.json gets {"ttft_ms": [...], "itl_ms": [...]} of the measured phase, computed
as the referee computes them (TTFT to the first content chunk; ITL per request (last - first) / (n - 1)).

The referee's source is executed as it is; only its per-request coroutine `one` is wrapped so that
each finished record is kept as well (one list append per request)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

REFEREE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "referee_loadgen.py"


def raw_series(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """TTFT and per-request ITL in ms of the successful records, as the referee computes them."""
    ok = [r for r in records if r["err"] is None and r["times"]]
    ttft = [(r["times"][0] - r["t0"]) * 1e3 for r in ok]
    itl = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) * 1e3 for r in ok if len(r["times"]) > 1]
    return {"ttft_ms": ttft, "itl_ms": itl}


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    raw_out, referee_args = sys.argv[1], sys.argv[2:]
    ns: dict[str, Any] = {"__name__": "__main__", "__file__": str(REFEREE)}
    measured: list[list[dict[str, Any]]] = [[]]  # the list the latest phase (warm-up, then measured) fills
    real_run: Callable[..., Any] = asyncio.run

    def run_recording(coro: Coroutine[Any, Any, Any], **kw: Any) -> Any:
        one = ns["one"]

        async def kept(session: Any, url: str, model: str, prompt: str, osl: int, rec: list) -> None:
            await one(session, url, model, prompt, osl, rec)
            measured[0] = rec

        ns["one"] = kept
        return real_run(coro, **kw)

    asyncio.run = run_recording  # type: ignore[assignment]
    sys.argv = [str(REFEREE), *referee_args]
    try:
        exec(compile(REFEREE.read_text(), str(REFEREE), "exec"), ns)
    finally:
        asyncio.run = real_run
    Path(raw_out).write_text(json.dumps(raw_series(measured[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TTFT of disaggregated serving, broken into its parts: Tandem aggregated, Tandem P/D, vLLM CPU P/D.

Each system is started here (one core a worker: prefill on core 0, decode on core 1; the aggregated
worker on core 0), serves the same random token-id prompts of each length, one request at a time
(no queueing), and is stopped. Prompts are distinct, so no prefix cache hits. Per prompt length,
the p50 over requests of:

    ttft     client: request sent -> first SSE chunk with a token
    t2       client: request sent -> second token (the decode worker's first in Tandem's P/D)
    prefill  router/proxy: prefill request sent -> first token back        (P/D)
    handoff  router/proxy: decode request sent -> first decode output      (P/D)
    kv_load  decode worker: KV load time (Tandem: DisaggConnector; vLLM: NIXL xfer time)
    p_busy   prefill (or aggregated) worker's engine step time for the request
    d_busy   decode worker's engine step time (Tandem: its one decode step; vLLM: the decode
             server's request_prefill_time, scheduled -> first token, KV load included)
    kv_mib   bytes loaded by the decode worker

Tandem streams the prefill worker's token at once, so its ttft = frontend + prefill and its t2 adds
the hand-off; vLLM's proxy (benchmarks/vllm_pd_proxy.py) drops the prefill's token and streams the
decode server's, so its ttft already includes the hand-off. Compare Tandem's t2 with vLLM's ttft
for the same work (prefill + KV transfer + one decode step).

    .venv/bin/python benchmarks/disagg_ttft.py --lengths 128 512 1024 2048 --repeats 7 \
        --systems tandem-agg tandem-pd vllm-pd --json /tmp/disagg_ttft.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml

from tandem.control.registry import RemoteDiscovery
from tandem.control.rpc_client import RpcClientPool
from tandem.protocol.registry import WorkerStats
from tandem.protocol.rpc import StatsCall

NAME = "smollm2"
VLLM_KV = '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
COLUMNS = ("ttft", "t2", "prefill", "handoff", "kv_load", "p_busy", "d_busy", "kv_mib")


def prompts(length: int, n: int, vocab: int = 48000) -> list[list[int]]:
    """n distinct random prompts of `length` ids (seeded by length: every system gets the same)."""
    rng = random.Random(length)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of `name` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def stream_one(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    times: list[float] = []
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, f"{r.status}: {await r.text()}"
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if json.loads(line[5:]).get("choices"):
                times.append(time.perf_counter() - t0)
    assert len(times) >= 2, f"expected >= 2 token chunks, got {len(times)}"
    return {"ttft": times[0], "t2": times[1], "e2e": times[-1]}


class Probe:
    """Counters read before and after each request; the difference is that request's share."""

    async def snapshot(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        return None


class TandemProbe(Probe):
    def __init__(self, url: str, registry: str) -> None:
        self.url = url
        self.discovery = RemoteDiscovery(registry)
        self.pool = RpcClientPool()
        self.http = aiohttp.ClientSession()

    async def snapshot(self) -> dict[str, float]:
        async with self.http.get(f"{self.url}/metrics") as r:
            text = await r.text()
        snap = {
            "prefill": metric_sum(text, "tandem_router_disagg_prefill_seconds_sum"),
            "handoff": metric_sum(text, "tandem_router_disagg_handoff_seconds_sum"),
        }
        for w in await self.discovery.list():
            s = await self.pool.call(w.address, StatsCall())
            assert isinstance(s, WorkerStats)
            if w.role in ("prefill", "agg"):
                snap["p_busy"] = s.busy_seconds_total
            if w.role == "decode":
                snap["d_busy"] = s.busy_seconds_total
            if w.role in ("decode", "agg"):
                snap["kv_load"] = s.kv_load_seconds_total
                snap["kv_mib"] = s.kv_load_bytes_total / 2**20
        return snap

    async def close(self) -> None:
        await self.http.close()
        await self.pool.close()
        await self.discovery.close()


class VllmProbe(Probe):
    def __init__(self, proxy: str, prefill: str, decode: str) -> None:
        self.proxy, self.prefill, self.decode = proxy, prefill, decode
        self.http = aiohttp.ClientSession()

    async def snapshot(self) -> dict[str, float]:
        async with self.http.get(f"{self.proxy}/timings") as r:
            timings = await r.json()
        async with self.http.get(f"{self.decode}/metrics") as r:
            dtext = await r.text()
        async with self.http.get(f"{self.prefill}/metrics") as r:
            ptext = await r.text()
        # The proxy's timings are per request already: summing them makes them counters too.
        return {
            "prefill": sum(t["prefill_s"] for t in timings),
            "handoff": sum(t["handoff_s"] for t in timings),
            "kv_load": metric_sum(dtext, "vllm:nixl_xfer_time_seconds_sum"),
            "kv_mib": metric_sum(dtext, "vllm:nixl_bytes_transferred_sum") / 2**20,
            "p_busy": metric_sum(ptext, "vllm:request_prefill_time_seconds_sum"),
            "d_busy": metric_sum(dtext, "vllm:request_prefill_time_seconds_sum"),
        }

    async def close(self) -> None:
        await self.http.close()


class Procs:
    """Child processes, each in its own session; `stop()` ends each group and waits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # the child process writes it
        p = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


async def wait_http(url: str, procs: Procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            dead = [p.args for p in procs.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"exited before ready: {dead} (logs in {procs.log_dir})")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s (logs in {procs.log_dir})")


@contextlib.asynccontextmanager
async def tandem(model: str, pd: bool, procs: Procs, port: int) -> AsyncIterator[tuple[str, Probe]]:
    pool = {"dtype": "bfloat16", "engine_args": {"max_model_len": 4096}}
    pools = (
        [
            {"name": "prefill", "role": "prefill", "cpus": [0], **pool},
            {"name": "decode", "role": "decode", "cpus": [1], **pool},
        ]
        if pd
        else [{"name": "agg", "role": "agg", "cpus": [0], **pool}]
    )
    spec = {
        "model": {"path": model, "served_name": NAME},
        "frontend": {"port": port},
        "router": {"disagg_min_prompt_tokens": 0},
        "pools": pools,
    }
    path = procs.log_dir / f"deploy-{'pd' if pd else 'agg'}.yaml"
    path.write_text(yaml.safe_dump(spec))
    registry = port + 1
    tandem_bin = str(Path(sys.executable).with_name("tandem"))
    procs.start(
        "tandem-pd" if pd else "tandem-agg",
        [tandem_bin, "serve", "-f", str(path), "--registry-port", str(registry)],
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/health", procs, 300)
    probe = TandemProbe(url, f"127.0.0.1:{registry}")
    try:
        yield url, probe
    finally:
        await probe.close()


@contextlib.asynccontextmanager
async def vllm_pd(model: str, venv: str, procs: Procs, port: int) -> AsyncIterator[tuple[str, Probe]]:
    urls = {}
    for i, role in enumerate(("prefill", "decode")):
        p = port + 1 + i
        env = {
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(5600 + 10 * i),
            "VLLM_CPU_OMP_THREADS_BIND": str(i),
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
        # Not the `vllm` script: it looks up the "vllm" distribution, and this one is "vllm-cpu".
        server = [f"{venv}/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        cmd = ["taskset", "-c", str(i), *server, "--port", str(p)]
        cmd += ["--served-model-name", NAME, "--dtype", "bfloat16", "--enforce-eager"]
        cmd += ["--max-model-len", "4096", "--kv-transfer-config", VLLM_KV]
        procs.start(f"vllm-{role}", cmd, env)
        urls[role] = f"127.0.0.1:{p}"
    for u in urls.values():
        await wait_http(f"http://{u}/health", procs, 600)
    proxy = Path(__file__).with_name("vllm_pd_proxy.py")
    procs.start(
        "vllm-proxy",
        [
            sys.executable,
            str(proxy),
            "--port",
            str(port),
            "--prefill",
            urls["prefill"],
            "--decode",
            urls["decode"],
        ],
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/timings", procs, 60)
    probe = VllmProbe(url, f"http://{urls['prefill']}", f"http://{urls['decode']}")
    try:
        yield url, probe
    finally:
        await probe.close()


async def measure(url: str, probe: Probe, lengths: list[int], repeats: int, max_tokens: int) -> dict:
    """Per length: one warm-up request, then `repeats` measured ones; each row a request."""
    rows: dict[int, list[dict[str, float]]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        for n in lengths:
            ps = prompts(n, repeats + 1)
            await stream_one(http, url, ps[0], max_tokens)
            rows[n] = []
            for p in ps[1:]:
                before = await probe.snapshot()
                row = await stream_one(http, url, p, max_tokens)
                after = await probe.snapshot()
                row.update({k: after[k] - before[k] for k in after})
                rows[n].append(row)
    return rows


def p50(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def table(results: dict[str, dict[int, list[dict[str, float]]]]) -> str:
    """Markdown: one row per (length, system), p50 in ms (kv_mib in MiB), then TTFT ratios."""
    out = ["| prompt | system | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    lengths = sorted({n for rows in results.values() for n in rows})
    for n in lengths:
        for system, by_len in results.items():
            cells = []
            for c in COLUMNS:
                v = p50(by_len.get(n, []), c)
                cells.append("—" if v is None else f"{v:.2f}" if c == "kv_mib" else f"{v * 1e3:.1f}")
            out.append(f"| {n} | {system} | " + " | ".join(cells) + " |")
    if "tandem-pd" in results and "vllm-pd" in results:
        out += [
            "",
            "| prompt | Tandem P/D ttft / vLLM P/D ttft | Tandem P/D t2 / vLLM P/D ttft |",
            "|---|---|---|",
        ]
        for n in lengths:
            ours, theirs = results["tandem-pd"].get(n, []), results["vllm-pd"].get(n, [])
            ttft, t2, base = p50(ours, "ttft"), p50(ours, "t2"), p50(theirs, "ttft")
            if ttft and t2 and base:
                out.append(f"| {n} | {ttft / base:.2f} | {t2 / base:.2f} |")
    return "\n".join(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="SmolLM2 folder (default: `tandem model smollm2`'s)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=2, help="2: the decode worker runs one step")
    ap.add_argument("--systems", nargs="+", default=["tandem-agg", "tandem-pd", "vllm-pd"])
    ap.add_argument("--vllm-venv", default=str(Path.home() / ".cache/tandem/vllm-venv"))
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--json", default=None, help="write every request's row here")
    args = ap.parse_args()
    if args.model is None:
        from tandem.models.smollm2 import convert_smollm2

        args.model = str(convert_smollm2())
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="disagg_ttft-"))
    print(f"logs: {log_dir}", file=sys.stderr)
    for system in args.systems:
        procs = Procs(log_dir)
        try:
            if system == "vllm-pd":
                ctx = vllm_pd(args.model, args.vllm_venv, procs, args.port)
            else:
                ctx = tandem(args.model, system == "tandem-pd", procs, args.port)
            async with ctx as (url, probe):
                results[system] = await measure(url, probe, args.lengths, args.repeats, args.max_tokens)
        except (RuntimeError, TimeoutError, AssertionError) as e:
            print(f"{system}: FAILED: {e}", file=sys.stderr)
        finally:
            procs.stop()
        print(f"{system}: done", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    asyncio.run(main())

"""Load generator: streams OpenAI requests at a server and records what the client saw.

    jobs = synthetic_jobs(1000, isl=100, osl=50, vocab=(100, 32000))   # or trace_jobs(load_mooncake(...))
    records = await run_load(LoadConfig(url, "tiny", concurrency=16), jobs)
    report = summarize(records, Slo())                                  # tandem.bench.report

Contracts:
- A `Job` is one request: token ids go to /v1/completions as a token-id prompt (exact lengths, no
  tokenizer needed); text goes to /v1/chat/completions. Every request streams, asks for
  `max_tokens` with `ignore_eos` (so lengths are what the workload says) and `include_usage`.
- Closed loop (`concurrency=C`): C workers each send their next job as soon as the last one ended.
  Open loop: each job is sent at its `arrival_s` (a trace's timestamps, or Poisson arrivals from
  `poisson_arrivals`), however many are in flight, unless `max_concurrency` caps them.
- `warmup` jobs run first (closed loop) and are not recorded.
- Request bodies are encoded before the run; per SSE event the client only finds the line, takes a
  timestamp and checks a few bytes, so it uses little of the CPU it shares with the server.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from tandem.bench.report import RequestRecord
from tandem.bench.traces import TraceRequest

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Job:
    prompt: list[int] | str
    """Token ids (sent to /v1/completions) or text (sent as one user message to /v1/chat/completions)."""
    max_tokens: int
    arrival_s: float = 0.0
    """Open loop: seconds after the run starts at which to send it."""


@dataclass(frozen=True)
class LoadConfig:
    url: str
    """Server base URL, e.g. http://127.0.0.1:8000 (with or without /v1)."""
    model: str
    concurrency: int | None = None
    """Closed loop with this many requests in flight; None: open loop at the jobs' arrival times."""
    max_concurrency: int | None = None
    """Open loop only: at most this many in flight (later arrivals wait); None: no cap."""
    warmup: int = 0
    """Jobs sent first, closed loop at `concurrency` (or 1), and not recorded."""
    timeout_s: float = 600.0
    """Per request."""
    server_timing: bool = False
    """Ask the server for each request's timing as it saw it (`nvext.extra_fields: ["timing"]`, which
    Tandem and NVIDIA Dynamo answer; `tandem.frontend.timing`) and record it (`RequestRecord.server`)."""

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError("warmup must be >= 0 and timeout_s > 0")

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


def synthetic_jobs(
    n: int, isl: int, osl: int, *, vocab: tuple[int, int] = (100, 32000), seed: int = 0
) -> list[Job]:
    """`n` jobs of `isl` random token ids in [vocab[0], vocab[1]) each (every prompt different, so no
    prefix is shared) asking for `osl` tokens."""
    if n < 0 or isl < 1 or osl < 1:
        raise ValueError("need n >= 0, isl >= 1, osl >= 1")
    lo, hi = vocab
    rng = random.Random(seed)
    return [Job([rng.randrange(lo, hi) for _ in range(isl)], osl) for _ in range(n)]


def chat_jobs(n: int, isl: int, osl: int, *, tokenizer_dir: str | Path, seed: int = 0) -> list[Job]:
    """`n` jobs whose text encodes to exactly `isl` tokens with the model's tokenizer (before the chat
    template), made by decoding random ids and re-encoding until the length settles."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        ids = [rng.randrange(min(6, vocab - 1), vocab) for _ in range(isl)]
        text = tok.decode(ids)
        for _ in range(5):
            got = tok.encode(text, add_special_tokens=False).ids
            if len(got) == isl:
                break
            got = got[:isl] + [rng.randrange(min(6, vocab - 1), vocab) for _ in range(isl - len(got))]
            text = tok.decode(got)
        jobs.append(Job(text, osl))
    return jobs


def trace_jobs(requests: Sequence[TraceRequest], *, max_prompt_len: int | None = None) -> list[Job]:
    """One job per trace request, at its arrival time; prompts are the trace's expanded token ids
    (cut to `max_prompt_len` when given, so a trace fits a short-context model)."""
    jobs = []
    for r in requests:
        ids = r.prompt_token_ids()
        if max_prompt_len is not None:
            ids = ids[:max_prompt_len]
        jobs.append(Job(ids, r.output_len, r.arrival_s))
    return jobs


def poisson_arrivals(jobs: Sequence[Job], rate: float, *, seed: int = 0) -> list[Job]:
    """The jobs with exponential inter-arrival gaps of mean 1/`rate` seconds (the first at 0)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i, job in enumerate(jobs):
        if i:
            t += rng.expovariate(rate)
        out.append(replace(job, arrival_s=t))
    return out


def vocab_range(tokenizer_dir: str | Path | None, default_hi: int = 32000) -> tuple[int, int]:
    """Ids safe for random prompts: above the usual special tokens, below the model's vocab size."""
    hi = default_hi
    if tokenizer_dir is not None:
        cfg = Path(tokenizer_dir) / "config.json"
        if cfg.is_file():
            hi = int(json.loads(cfg.read_text()).get("vocab_size", hi))
        else:
            from tokenizers import Tokenizer

            hi = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size()
    return (min(100, hi // 4), hi)


class _Request:
    """One job's URL and pre-encoded body, and how to recognise its output events."""

    __slots__ = ("body", "marker", "timing", "url")

    def __init__(self, config: LoadConfig, job: Job) -> None:
        common: dict[str, Any] = {
            "model": config.model,
            "max_tokens": job.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        self.timing = config.server_timing
        if self.timing:
            common["nvext"] = {"extra_fields": ["timing"]}
        if isinstance(job.prompt, str):
            self.url = config.base + "/chat/completions"
            self.body = _encode({**common, "messages": [{"role": "user", "content": job.prompt}]})
            self.marker = b'"content"'
        else:
            self.url = config.base + "/completions"
            self.body = _encode({**common, "prompt": job.prompt})
            self.marker = b'"text"'


async def _send(session: object, req: _Request, timeout_s: float) -> RequestRecord:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    rec = RequestRecord(t_start=time.perf_counter())
    if req.timing:
        rec.sent_unix_ms = time.time() * 1000.0
    times = rec.chunk_times
    marker = req.marker
    try:
        async with session.post(
            req.url,
            data=req.body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    if line.startswith(b"data: [DONE]"):
                        break
                    if b'"choices":[]' in line:
                        usage = json.loads(line[6:]).get("usage") or {}
                        rec.output_tokens = int(usage.get("completion_tokens", 0))
                        rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    elif line.startswith(b'data: {"error"'):
                        rec.error = line[6:].decode(errors="replace").strip()[:200]
                        break
                    elif marker in line:
                        times.append(now)
                    # The finish chunk (with or without text: Dynamo's has an empty delta).
                    if req.timing and b'"nvext"' in line:
                        rec.server = json.loads(line[6:])["nvext"].get("timing")
    except Exception as e:  # a benchmark records failures instead of stopping
        rec.error = f"{type(e).__name__}: {e}"
    rec.t_end = time.perf_counter()
    if rec.output_tokens == 0:
        rec.output_tokens = len(times)
    return rec


async def _closed_loop(
    session: object, config: LoadConfig, reqs: list[_Request], c: int
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    it = iter(reqs)

    async def worker() -> None:
        for req in it:
            records.append(await _send(session, req, config.timeout_s))

    await asyncio.gather(*(worker() for _ in range(min(c, len(reqs)))))
    return records


async def _open_loop(
    session: object, config: LoadConfig, reqs: list[_Request], arrivals: list[float]
) -> list[RequestRecord]:
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(req: _Request) -> RequestRecord:
        if limit is None:
            return await _send(session, req, config.timeout_s)
        async with limit:
            return await _send(session, req, config.timeout_s)

    tasks = []
    for req, at in zip(reqs, arrivals, strict=True):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(req)))
    return list(await asyncio.gather(*tasks))


async def run_load(
    config: LoadConfig,
    jobs: Sequence[Job],
    around: Callable[[Any], Awaitable[None]] | None = None,
) -> list[RequestRecord]:
    """Run the warmup jobs, then the rest (closed or open loop); the records of the measured jobs.

    `around(session)`, if given, is awaited just before the measured jobs start and just after they
    all ended (`tandem bench` reads the server's engine counters there)."""
    import aiohttp

    warm = [_Request(config, j) for j in jobs[: config.warmup]]
    rest = list(jobs[config.warmup :])
    if config.concurrency is None:
        rest.sort(key=lambda j: j.arrival_s)
    measured = [_Request(config, j) for j in rest]
    arrivals = [j.arrival_s for j in rest]
    if arrivals:
        arrivals = [a - arrivals[0] for a in arrivals]  # the trace starts when the warmup is over
    limit = config.concurrency or config.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        if warm:
            await _closed_loop(session, config, warm, config.concurrency or 1)
        if around is not None:
            await around(session)
        if config.concurrency is not None:
            records = await _closed_loop(session, config, measured, config.concurrency)
        else:
            records = await _open_loop(session, config, measured, arrivals)
        if around is not None:
            await around(session)
        return records

"""Every environment variable Tandem reads, read here and nowhere else, and the CPUs this process
may use (`usable_cpus`).

Each is a function rather than a module constant so tests can set the variable (monkeypatch.setenv)
after import and see it take effect.
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cache_dir() -> Path:
    """TANDEM_CACHE_DIR: where converted models and other downloads live (default ~/.cache/tandem)."""
    value = os.environ.get("TANDEM_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "tandem"


def models_dir() -> Path:
    """Converted checkpoints, one folder each, under the cache dir."""
    return cache_dir() / "models"


def torch_threads() -> int | None:
    """TANDEM_TORCH_THREADS: intra-op threads of the built-in engine on CPU (unset: the cores this
    process may run on, or OMP_NUM_THREADS if set). A positive integer."""
    return _int_at_least("TANDEM_TORCH_THREADS", 1)


def cpu_half() -> str:
    """TANDEM_CPU_HALF: what the built-in engine does when asked for bfloat16/float16 on a CPU
    without arithmetic for it: "upcast" (default) computes in float32, "native" keeps the emulated
    type (half the memory, several times slower)."""
    value = os.environ.get("TANDEM_CPU_HALF") or "upcast"
    if value not in ("upcast", "native"):
        raise ValueError(f"TANDEM_CPU_HALF must be 'upcast' or 'native', got {value!r}")
    return value


def pack_weights() -> bool:
    """TANDEM_PACK_WEIGHTS: "0" stops the built-in engine prepacking its weights for oneDNN on CPU
    (a second copy of the weights in memory; multi-row matmuls 1.2-1.8x faster). Default "1"."""
    value = os.environ.get("TANDEM_PACK_WEIGHTS") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"TANDEM_PACK_WEIGHTS must be 0 or 1, got {value!r}")
    return value == "1"


def tiktoken_enabled() -> bool:
    """TANDEM_TIKTOKEN: "0" keeps the frontend's plain-text tokenization on the Hugging Face tokenizer
    even where tiktoken gives the same ids (`tandem/frontend/fast_bpe.py`). Default "1"."""
    value = os.environ.get("TANDEM_TIKTOKEN") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"TANDEM_TIKTOKEN must be 0 or 1, got {value!r}")
    return value == "1"


def chat_token_cache_chars() -> int:
    """TANDEM_CHAT_TOKEN_CACHE_CHARS: how many characters of chat text the frontend keeps token ids
    for, so each turn of a conversation encodes only its new messages (default 16,000,000: about 50 MB
    of text and ids; 0 turns the cache off)."""
    n = _int_at_least("TANDEM_CHAT_TOKEN_CACHE_CHARS", 0)
    return 16_000_000 if n is None else n


def max_request_bytes() -> int:
    """TANDEM_MAX_REQUEST_BYTES: the largest HTTP request body the frontend reads (default 32 MiB);
    a larger one is refused with a 413 before it is buffered. 32 MiB holds a 128k-token prompt
    as text or as a JSON list of token ids several times over."""
    n = _int_at_least("TANDEM_MAX_REQUEST_BYTES", 1)
    return 32 * 1024 * 1024 if n is None else n


def tokenize_batch_chars() -> int:
    """TANDEM_TOKENIZE_BATCH_CHARS: prompts (or a chat's new text) longer than this many characters,
    sent while other requests are in flight, are tokenized together with the prompts that arrive with
    them, in one batch call, on a tokenizer thread (default 4096; shorter ones are tokenized at once on
    the event loop, ~0.2 ms for 500 characters)."""
    n = _int_at_least("TANDEM_TOKENIZE_BATCH_CHARS", 0)
    return 4096 if n is None else n


def worker_switch_interval_s() -> float | None:
    """TANDEM_WORKER_SWITCH_INTERVAL_MS: how long a worker process's threads may hold the GIL while
    another waits for it (`sys.setswitchinterval`), in ms; unset or 0 keeps Python's 5 ms.

    A worker's event loop thread (request plane) and its engine thread share the GIL: at 5 ms the
    loop can wait for the engine thread's host work of the next step before it writes a step's
    tokens or takes in a new request. At 0.5 ms a c=16 closed loop's slowest 1% of hand-offs from
    the worker to the frontend fell from 9-13 ms to 2-2.5 ms, and its TTFT p99 from 6 ms over
    NVIDIA Dynamo's to under it; but a saturated worker (simulated engine at speed-up 10000) served
    40% fewer requests, its two threads trading the GIL back and forth (docs/benchmarks.md,
    session 21). So the default stays Python's."""
    value = os.environ.get("TANDEM_WORKER_SWITCH_INTERVAL_MS")
    ms = float(value) if value else 0.0
    if not 0 <= ms <= 100:
        raise ValueError(f"TANDEM_WORKER_SWITCH_INTERVAL_MS must be in [0, 100], got {value!r}")
    return ms / 1000 if ms else None


def _int_at_least(name: str, minimum: int) -> int | None:
    """The integer setting `name` (None when unset); ValueError below `minimum`."""
    value = os.environ.get(name)
    if not value:
        return None
    n = int(value)
    if n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return n

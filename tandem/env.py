"""Every environment variable Tandem reads, read here and nowhere else.

Each is a function rather than a module constant so tests can set the variable (monkeypatch.setenv)
after import and see it take effect.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    value = os.environ.get("TANDEM_TORCH_THREADS")
    if not value:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"TANDEM_TORCH_THREADS must be a positive integer, got {value!r}")
    return n


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


def chat_token_cache_chars() -> int:
    """TANDEM_CHAT_TOKEN_CACHE_CHARS: how many characters of chat text the frontend keeps token ids
    for, so each turn of a conversation encodes only its new messages (default 16,000,000: about 50 MB
    of text and ids; 0 turns the cache off)."""
    return _non_negative_int("TANDEM_CHAT_TOKEN_CACHE_CHARS", 16_000_000)


def tokenize_thread_chars() -> int:
    """TANDEM_TOKENIZE_THREAD_CHARS: prompts (or a chat's new text) longer than this many characters
    are tokenized on the frontend's tokenizer threads instead of its event loop (default 256)."""
    return _non_negative_int("TANDEM_TOKENIZE_THREAD_CHARS", 256)


def _non_negative_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    n = int(value)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return n

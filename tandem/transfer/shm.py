"""A KV cache tensor that lives in shared memory, so a peer on the same host copies blocks from it
directly (one copy, no socket). The file is in /dev/shm and removed when the owner closes it."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class SharedKvCache:
    """Owner side: allocate a zeroed, file-backed tensor of `shape`.

    The file is unlinked at once and kept alive by an open descriptor; peers open it through
    `/proc/<pid>/fd/<fd>`. So nothing is left in /dev/shm however the owner dies (kill -9
    included): the memory goes when the owner and every peer mapping are gone.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, prefix: str = "tandem-kv") -> None:
        created = SHM_DIR / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        numel = 1
        for d in shape:
            numel *= d
        # from_file(shared=True) creates the file at the right size; fresh pages read as zeros.
        self.tensor = torch.from_file(str(created), shared=True, size=numel, dtype=dtype).view(shape)
        # Touch every page now: otherwise each fresh block faults on first write (here) and on
        # first read (in a peer), which costs a transfer ~10x its copy time.
        self.tensor.zero_()
        self._fd = os.open(created, os.O_RDWR)
        created.unlink()
        self.path = Path(f"/proc/{os.getpid()}/fd/{self._fd}")
        self.shape = shape
        self.dtype = dtype

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def shm_has_room(nbytes: int) -> bool:
    """Whether /dev/shm can hold `nbytes` more (a full tmpfs would SIGBUS on first touch)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize > nbytes * 1.1


def open_shared(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Peer side: map an owner's cache read-write (the caller only reads it)."""
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * torch.empty((), dtype=dtype).element_size()
    actual = os.path.getsize(path)
    if actual != expected:
        raise OSError(f"{path} holds {actual} bytes, expected {expected} for {shape} {dtype}")
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


def copy_blocks(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> None:
    """dst[:, dst_ids[i]] = src[:, src_ids[i]] for every layer, one copy per run of consecutive ids.

    Runs where both sides are consecutive become one strided slice copy; a whole prompt allocated
    from a fresh pool is usually a single run.
    """
    assert len(src_ids) == len(dst_ids), "one destination block per source block"
    i = 0
    n = len(src_ids)
    while i < n:
        j = i + 1
        while j < n and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        dst[:, dst_ids[i] : dst_ids[i] + (j - i)].copy_(src[:, src_ids[i] : src_ids[i] + (j - i)])
        i = j

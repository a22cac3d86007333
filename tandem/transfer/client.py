"""Block reader: the decode side of KV transfer. Copies a peer's held blocks into local blocks."""

from __future__ import annotations

import asyncio
import logging
import os
import warnings

import torch

from tandem.protocol.errors import TransferFailedError
from tandem.transfer.layout import KvLayout, torch_dtype
from tandem.transfer.server import MAX_CHUNK_BYTES
from tandem.transfer.shm import copy_blocks, open_shared
from tandem.transfer.wire import Done, ReadBlocks, ReadReply, pack, read_message

log = logging.getLogger(__name__)


class BlockReader:
    """Reads held blocks from peers into `kv`. Keeps peers' shared-memory caches mapped."""

    def __init__(self, kv: torch.Tensor | None, layout: KvLayout, *, prefer_shm: bool = True) -> None:
        self.kv = kv
        self.layout = layout
        self.prefer_shm = prefer_shm
        self._mapped: dict[str, torch.Tensor] = {}
        self.bytes_received = 0

    async def read(
        self,
        address: str,
        handle: str,
        dst_block_ids: list[int],
        *,
        first_block: int = 0,
        shm_path: str = "",
        timeout_s: float = 30.0,
    ) -> str:
        """Copy the blocks held under `handle` at `address` (minus the first `first_block`) into
        `dst_block_ids`. Shared memory is used when the peer's `shm_path` exists on this host.
        Returns the path taken ("shm", "tcp", or "none" without tensors). Raises TransferFailedError."""
        use_shm = bool(shm_path) and self.prefer_shm and self.kv is not None and os.path.exists(shm_path)
        via = "shm" if use_shm else "tcp"
        try:
            return await asyncio.wait_for(
                self._read(address, handle, dst_block_ids, first_block, via), timeout_s
            )
        except TransferFailedError:
            raise
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            raise TransferFailedError(f"reading KV {handle} from {address} failed: {e!r}") from e

    async def _read(self, address: str, handle: str, dst_ids: list[int], first_block: int, via: str) -> str:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(pack(ReadBlocks(handle, self.layout, first_block, via)))
            reply = await read_message(reader)
            if not isinstance(reply, ReadReply):
                raise TransferFailedError(f"unexpected transfer message {type(reply).__name__}")
            if not reply.ok:
                raise TransferFailedError(reply.error)
            if reply.num_blocks != len(dst_ids):
                raise TransferFailedError(f"peer holds {reply.num_blocks} blocks, {len(dst_ids)} expected")
            if self.kv is None:
                path = "none"
            elif reply.shm_path:
                src = self._map(reply.shm_path, tuple(reply.shape))
                copy_blocks(src, reply.src_block_ids, self.kv, dst_ids)
                path = "shm"
            else:
                await self._recv_blocks(reader, dst_ids)
                path = "tcp"
            writer.write(pack(Done(handle)))
            await writer.drain()
            return path
        finally:
            writer.close()

    def _map(self, path: str, shape: tuple[int, ...]) -> torch.Tensor:
        src = self._mapped.get(path)
        if src is None:
            src = self._mapped[path] = open_shared(path, shape, torch_dtype(self.layout))
        return src

    async def _recv_blocks(self, reader: asyncio.StreamReader, dst_ids: list[int]) -> None:
        assert self.kv is not None
        block_bytes = self.layout.layer_block_bytes
        per_chunk = max(1, MAX_CHUNK_BYTES // block_bytes)
        shape = self.layout.layer_block_shape
        dtype = torch_dtype(self.layout)
        index_all = torch.tensor(dst_ids, dtype=torch.long, device=self.kv.device)
        for layer in range(self.layout.num_layers):
            for start in range(0, len(dst_ids), per_chunk):
                idx = index_all[start : start + per_chunk]
                raw = await reader.readexactly(len(idx) * block_bytes)
                self.bytes_received += len(raw)
                with warnings.catch_warnings():
                    # `raw` is read-only and only read from here: no copy into a writable buffer.
                    warnings.simplefilter("ignore", UserWarning)
                    part = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(len(idx), *shape)
                self.kv[layer].index_copy_(0, idx, part.to(self.kv.device))

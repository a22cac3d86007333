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


class _StaleConnection(Exception):
    """A reused connection failed before the peer answered: it had been closed while idle."""


MAX_IDLE_PER_PEER = 4
"""Idle connections kept per peer block server, for concurrent transfers from one peer."""


class BlockReader:
    """Reads held blocks from peers into `kv`. Keeps peers' shared-memory caches mapped."""

    def __init__(self, kv: torch.Tensor | None, layout: KvLayout, *, prefer_shm: bool = True) -> None:
        self.kv = kv
        self.layout = layout
        self.prefer_shm = prefer_shm
        self._mapped: dict[str, torch.Tensor] = {}
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self.bytes_received = 0

    async def read(
        self,
        address: str,
        handle: str,
        dst_block_ids: list[int],
        *,
        first_block: int = 0,
        shm_path: str = "",
        src_block_ids: list[int] | None = None,
        shm_shape: list[int] | None = None,
        timeout_s: float = 30.0,
    ) -> str:
        """Copy the blocks held under `handle` at `address` (minus the first `first_block`) into
        `dst_block_ids`. Shared memory is used when the peer's `shm_path` exists on this host.
        Returns the path taken ("shm", "tcp", or "none" without tensors). Raises TransferFailedError."""
        use_shm = bool(shm_path) and self.prefer_shm and self.kv is not None and os.path.exists(shm_path)
        via = "shm" if use_shm else "tcp"
        if use_shm and src_block_ids is not None and shm_shape:
            return await self._read_one_sided(address, handle, dst_block_ids, first_block, shm_path,
                                              src_block_ids, shm_shape, timeout_s)  # fmt: skip
        try:
            try:
                return await asyncio.wait_for(
                    self._read(address, handle, dst_block_ids, first_block, via), timeout_s
                )
            except (OSError, asyncio.IncompleteReadError) as e:
                if not getattr(e, "reused_connection", False):
                    raise
                # An idle pooled connection the peer had closed: one retry on a fresh one.
                return await asyncio.wait_for(
                    self._read(address, handle, dst_block_ids, first_block, via, fresh=True), timeout_s
                )
        except TransferFailedError:
            raise
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            raise TransferFailedError(f"reading KV {handle} from {address} failed: {e!r}") from e

    async def _read(
        self,
        address: str,
        handle: str,
        dst_ids: list[int],
        first_block: int,
        via: str,
        *,
        fresh: bool = False,
    ) -> str:
        reader, writer, reused = await self._connect(address, fresh)
        clean = False
        try:
            writer.write(pack(ReadBlocks(handle, self.layout, first_block, via)))
            try:
                reply = await read_message(reader)
            except (OSError, asyncio.IncompleteReadError) as e:
                if reused:
                    raise _StaleConnection() from e
                raise
            if not isinstance(reply, ReadReply):
                raise TransferFailedError(f"unexpected transfer message {type(reply).__name__}")
            if not reply.ok:
                clean = True  # the peer refused; the connection is still in step
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
            clean = True
            return path
        finally:
            if clean and len(self._idle.setdefault(address, [])) < MAX_IDLE_PER_PEER:
                self._idle[address].append((reader, writer))
            else:
                writer.close()

    async def _read_one_sided(
        self,
        address: str,
        handle: str,
        dst_ids: list[int],
        first_block: int,
        shm_path: str,
        src_block_ids: list[int],
        shm_shape: list[int],
        timeout_s: float,
    ) -> str:
        """Copy held blocks straight out of the peer's mapped cache, then tell it they were read.

        The peer's hold keeps the blocks unchanged until our Done; its KV layout was checked
        against ours at registration, and here again against the file's shape and size.
        """
        assert self.kv is not None
        src_ids = src_block_ids[first_block:]
        if len(src_ids) != len(dst_ids):
            raise TransferFailedError(f"peer holds {len(src_ids)} blocks, {len(dst_ids)} expected")
        shape = tuple(shm_shape)
        if (
            len(shape) != self.kv.dim()
            or shape[0] != self.kv.shape[0]
            or shape[2:] != tuple(self.kv.shape[2:])
        ):
            raise TransferFailedError(
                f"peer KV cache shape {shape} does not match ours {tuple(self.kv.shape)}"
            )
        try:
            src = self._map(shm_path, shape)
        except OSError as e:
            raise TransferFailedError(f"cannot map the peer's KV cache {shm_path}: {e}") from e
        copy_blocks(src, src_ids, self.kv, dst_ids)
        try:
            await asyncio.wait_for(self._send_done(address, handle), timeout_s)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, _StaleConnection) as e:
            # The blocks are copied; a peer that cannot hear Done frees them at its hold timeout.
            log.warning("KV %s read, but telling %s failed: %r", handle, address, e)
        return "shm"

    async def _send_done(self, address: str, handle: str) -> None:
        for fresh in (False, True):
            reader, writer, reused = await self._connect(address, fresh)
            try:
                writer.write(pack(Done(handle)))
                await writer.drain()
            except OSError:
                writer.close()
                if reused and not fresh:
                    continue
                raise
            if len(self._idle.setdefault(address, [])) < MAX_IDLE_PER_PEER:
                self._idle[address].append((reader, writer))
            else:
                writer.close()
            return

    async def _connect(
        self, address: str, fresh: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """An idle pooled connection to `address` (reused=True), or a new one."""
        pool = self._idle.get(address, [])
        while pool and not fresh:
            reader, writer = pool.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return reader, writer, False

    def close(self) -> None:
        """Close pooled connections."""
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()

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

"""Block server: the prefill side of KV transfer. Holds finished requests' blocks until a decode
worker has read them (or a timeout frees them) and serves the reads over TCP or shared memory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.protocol.errors import TransferFailedError
from tandem.transfer.layout import KvLayout, check_compatible
from tandem.transfer.wire import Done, ReadBlocks, ReadReply, Release, pack, read_message

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 8 << 20
"""Raw KV bytes written per socket write: bounds the server's extra memory per transfer."""


@dataclass
class _Hold:
    block_ids: list[int]
    deadline: float


class BlockServer:
    """Serves `kv` (a [layers, blocks, 2, block, heads, dim] tensor) to peers. With `kv` None
    (the simulated engine) only the hand-off runs: no bytes follow the reply.

    `on_release(handle)` runs (in the server's loop) when a hold ends: read by a peer or expired.
    """

    def __init__(
        self,
        kv: torch.Tensor | None,
        layout: KvLayout,
        on_release: Callable[[str], None],
        *,
        shm_path: str = "",
        hold_timeout_s: float = 120.0,
    ) -> None:
        self.kv = kv
        self.layout = layout
        self.on_release = on_release
        self.shm_path = shm_path
        self.hold_timeout_s = hold_timeout_s
        self._holds: dict[str, _Hold] = {}
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task | None = None
        self.address = ""
        self.bytes_sent = 0
        self.num_expired = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._serve, host, port)
        sock = self._server.sockets[0].getsockname()
        self.address = f"{sock[0]}:{sock[1]}"
        self._reaper = asyncio.create_task(self._reap())
        return self.address

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for writer in list(self._conns):
            writer.close()  # peers' pooled connections end too: they must not reach a stopped server
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    def hold(self, handle: str, block_ids: list[int]) -> None:
        """Keep `block_ids` readable under `handle` until read or `hold_timeout_s` passes."""
        self._holds[handle] = _Hold(list(block_ids), time.monotonic() + self.hold_timeout_s)

    def release(self, handle: str) -> None:
        if self._holds.pop(handle, None) is not None:
            self.on_release(handle)

    @property
    def num_held(self) -> int:
        return len(self._holds)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for handle in [h for h, hold in self._holds.items() if hold.deadline < now]:
                log.warning(
                    "KV hold %s expired unread after %.0fs; freeing its blocks", handle, self.hold_timeout_s
                )
                self.num_expired += 1
                self.release(handle)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One peer connection, reused for many transfers (a connection costs as much as copying a
        short prompt's blocks through shared memory)."""
        handle = ""
        self._conns.add(writer)
        try:
            while True:
                try:
                    msg = await read_message(reader)
                except asyncio.IncompleteReadError:
                    return  # the peer closed between transfers
                if isinstance(msg, Release | Done):
                    # Release: given up unread. Done outside a ReadBlocks exchange: the peer read
                    # the blocks one-sidedly from shared memory.
                    self.release(msg.handle)
                    continue
                if not isinstance(msg, ReadBlocks):
                    raise ConnectionError(f"expected ReadBlocks, got {type(msg).__name__}")
                handle = msg.handle
                await self._serve_read(msg, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.warning("KV read of %s failed: %s (blocks stay held until read or expiry)", handle, e)
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _serve_read(
        self, msg: ReadBlocks, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        hold = self._holds.get(msg.handle)
        try:
            if hold is None:
                raise TransferFailedError(f"no KV held under {msg.handle!r} (expired or already read)")
            check_compatible(local=msg.layout, remote=self.layout)  # worded for the reader
        except TransferFailedError as e:
            writer.write(pack(ReadReply(ok=False, error=str(e))))
            await writer.drain()
            return
        ids = hold.block_ids[msg.first_block :]
        if msg.via == "shm" and self.shm_path and self.kv is not None:
            reply = ReadReply(
                ok=True,
                num_blocks=len(ids),
                shm_path=self.shm_path,
                shape=list(self.kv.shape),
                src_block_ids=ids,
            )
            writer.write(pack(reply))
            await writer.drain()
        else:
            writer.write(pack(ReadReply(ok=True, num_blocks=len(ids))))
            await self._send_blocks(writer, ids)
        done = await read_message(reader)
        if not isinstance(done, Done) or done.handle != msg.handle:
            raise ConnectionError(f"expected Done for {msg.handle!r}, got {done!r}")
        self.release(msg.handle)

    async def _send_blocks(self, writer: asyncio.StreamWriter, ids: list[int]) -> None:
        if not ids or self.kv is None:
            return
        per_chunk = max(1, MAX_CHUNK_BYTES // self.layout.layer_block_bytes)
        index_all = torch.tensor(ids, dtype=torch.long, device=self.kv.device)
        for layer in range(self.layout.num_layers):
            for start in range(0, len(ids), per_chunk):
                part = self.kv[layer].index_select(0, index_all[start : start + per_chunk]).cpu()
                # Zero-copy: the transport keeps a reference to the buffer until it is written.
                # 1-D, so len() is the byte count asyncio's transport expects.
                data = memoryview(part.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]
                writer.write(data)
                self.bytes_sent += data.nbytes
                await writer.drain()

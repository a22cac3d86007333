"""Messages of the KV transfer protocol (prefill side serves, decode side reads).

One connection per transfer:

    reader                                   block server (holds the blocks)
      ReadBlocks(handle, layout, first, via) ->
                                           <- ReadReply(ok, blocks, shm_path | -)
      via "tcp":                           <- layer 0 bytes, layer 1 bytes, ... (raw, sizes known)
      via "shm": copies from the mapped file itself
      Done(handle)                         ->  the server releases the held blocks

    or, a same-host reader that got the source block ids in the transfer parameters copies from
    the shared-memory cache first and only then sends
      Done(handle)                         ->  the server releases the held blocks

    or, from whoever gave up on the transfer (the router, when a client leaves early):
      Release(handle)                      ->  the server releases the held blocks unread

Control messages are length-prefixed msgpack, bounded in size; the raw KV bytes that follow a reply
have sizes fixed by the layout and block count, so nothing unbounded is ever read.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from tandem.protocol.kv_layout import KvLayout

MAX_CONTROL_BYTES = 1 << 20
_LEN = struct.Struct(">I")


class ReadBlocks(msgspec.Struct, tag="read"):
    handle: str
    layout: KvLayout
    first_block: int = 0
    """Skip this many leading blocks (the reader already holds them: a local prefix hit)."""
    via: str = "tcp"


class ReadReply(msgspec.Struct, tag="reply"):
    ok: bool
    error: str = ""
    num_blocks: int = 0
    shm_path: str = ""
    shape: list[int] = msgspec.field(default_factory=list)
    src_block_ids: list[int] = msgspec.field(default_factory=list)


class Done(msgspec.Struct, tag="done"):
    handle: str


class Release(msgspec.Struct, tag="release"):
    """Free a hold without reading it (the request ended before its decode worker pulled the KV)."""

    handle: str


Message = ReadBlocks | ReadReply | Done | Release
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Message)


def pack(msg: Message) -> bytes:
    body = _enc.encode(msg)
    return _LEN.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Message:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_CONTROL_BYTES:
        raise ConnectionError(f"transfer control message of {size} bytes exceeds {MAX_CONTROL_BYTES}")
    return _dec.decode(await reader.readexactly(size))

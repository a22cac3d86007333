import asyncio

import pytest
import torch

from tandem.protocol.errors import TransferFailedError
from tandem.transfer.client import BlockReader
from tandem.transfer.layout import layout_of
from tandem.transfer.server import BlockServer
from tandem.transfer.shm import SharedKvCache, copy_blocks

SHAPE = (3, 16, 2, 2, 4, 8)  # layers, blocks, K/V, kv heads, block size, head dim


async def eventually(cond, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return False


def filled(shape=SHAPE, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("via", ["tcp", "shm"])
async def test_blocks_arrive_identical_and_the_hold_is_released(via):
    shared = SharedKvCache(SHAPE, torch.bfloat16) if via == "shm" else None
    src = shared.tensor if shared else torch.empty(SHAPE, dtype=torch.bfloat16)
    src.copy_(filled())
    released: list[str] = []
    layout = layout_of(src, model="m")
    server = BlockServer(src, layout, released.append, shm_path=str(shared.path) if shared else "")
    addr = await server.start()
    try:
        dst = torch.zeros(SHAPE, dtype=torch.bfloat16)
        server.hold("req-1", [3, 4, 5, 9])
        reader = BlockReader(dst, layout_of(dst, model="m"))
        shm_path = str(shared.path) if shared else ""
        path = await reader.read(addr, "req-1", [0, 1, 7, 8], first_block=0, shm_path=shm_path)
        assert path == via
        assert torch.equal(dst[:, [0, 1, 7, 8]], src[:, [3, 4, 5, 9]])
        assert dst[:, 2].abs().sum() == 0, "only the destination blocks are written"
        assert await eventually(lambda: released == ["req-1"]), "Done releases the hold"
        assert server.num_held == 0
        # Skipping blocks the reader already has.
        server.hold("req-2", [10, 11, 12])
        await reader.read(addr, "req-2", [13], first_block=2, shm_path=shm_path)
        assert torch.equal(dst[:, 13], src[:, 12])
    finally:
        await server.stop()
        if shared:
            shared.close()


async def test_mismatched_layout_is_a_clear_error_and_keeps_the_hold():
    src = filled()
    server = BlockServer(src, layout_of(src, model="m"), lambda h: None)
    addr = await server.start()
    try:
        server.hold("h", [1])
        dst = torch.zeros((3, 16, 2, 2, 8, 8), dtype=torch.float32)
        with pytest.raises(TransferFailedError, match=r"block_size: 4 there vs 8 here.*dtype"):
            await BlockReader(dst, layout_of(dst, model="m")).read(addr, "h", [0])
        assert server.num_held == 1
        with pytest.raises(TransferFailedError, match="no KV held"):
            await BlockReader(src.clone(), layout_of(src, model="m")).read(addr, "nope", [0])
    finally:
        await server.stop()


async def test_unread_hold_expires():
    src = filled()
    released: list[str] = []
    server = BlockServer(src, layout_of(src), released.append, hold_timeout_s=0.05)
    await server.start()
    try:
        server.hold("h", [1, 2])
        for _ in range(40):
            if released:
                break
            await asyncio.sleep(0.1)
        assert released == ["h"] and server.num_expired == 1
    finally:
        await server.stop()


async def test_dead_peer_is_a_transfer_error():
    dst = filled()
    with pytest.raises(TransferFailedError):
        await BlockReader(dst, layout_of(dst)).read("127.0.0.1:1", "h", [0], timeout_s=2)


def test_copy_blocks_handles_runs_and_scatter():
    src, dst = filled(), torch.zeros(SHAPE, dtype=torch.bfloat16)
    copy_blocks(src, [0, 1, 2, 7, 9], dst, [4, 5, 6, 0, 1])
    assert torch.equal(dst[:, [4, 5, 6, 0, 1]], src[:, [0, 1, 2, 7, 9]])


async def test_large_tcp_transfer_arrives_intact():
    """Megabytes per layer: the socket writes partially and the rest must still arrive in order."""
    big = (2, 72, 2, 16, 8, 64)
    src = filled(big)
    server = BlockServer(src, layout_of(src), lambda h: None)
    addr = await server.start()
    try:
        ids = list(range(2, 70))
        server.hold("h", ids)
        dst = torch.zeros(big, dtype=torch.bfloat16)
        assert await BlockReader(dst, layout_of(dst)).read(addr, "h", ids[::-1]) == "tcp"
        assert torch.equal(dst[:, ids[::-1]], src[:, ids])
    finally:
        await server.stop()


async def test_release_frees_a_hold_unread():
    from tandem.transfer.release import release_hold

    src = filled()
    released: list[str] = []
    server = BlockServer(src, layout_of(src), released.append)
    addr = await server.start()
    try:
        server.hold("h", [1, 2])
        assert await release_hold(addr, "h")
        assert await eventually(lambda: released == ["h"])
        assert await release_hold(addr, "h"), "releasing twice is harmless"
        assert released == ["h"]
    finally:
        await server.stop()
    assert not await release_hold("127.0.0.1:1", "h"), "an unreachable server is reported, not raised"


async def test_connections_are_reused_and_a_stale_one_is_replaced():
    src = filled()
    server = BlockServer(src, layout_of(src), lambda h: None)
    addr = await server.start()
    dst = torch.zeros(SHAPE, dtype=torch.bfloat16)
    reader = BlockReader(dst, layout_of(dst))
    try:
        server.hold("a", [1])
        server.hold("b", [2])
        await reader.read(addr, "a", [5])
        (conn,) = reader._idle[addr]
        await reader.read(addr, "b", [6])
        assert reader._idle[addr] == [conn], "the second transfer reused the first one's connection"
        assert torch.equal(dst[:, [5, 6]], src[:, [1, 2]])
        # The peer restarts on the same port: the pooled connection is dead, the read still works.
        await server.stop()
        port = int(addr.rsplit(":", 1)[1])
        server = BlockServer(src, layout_of(src), lambda h: None)
        await server.start(port=port)
        server.hold("c", [3])
        await reader.read(addr, "c", [7])
        assert torch.equal(dst[:, 7], src[:, 3])
    finally:
        reader.close()
        await server.stop()


async def test_one_sided_shared_memory_read_then_done():
    """Given the source block ids up front, the reader copies first and then releases the hold."""
    shared = SharedKvCache(SHAPE, torch.bfloat16)
    shared.tensor.copy_(filled())
    released: list[str] = []
    server = BlockServer(shared.tensor, layout_of(shared.tensor), released.append, shm_path=str(shared.path))
    addr = await server.start()
    dst = torch.zeros(SHAPE, dtype=torch.bfloat16)
    reader = BlockReader(dst, layout_of(dst))
    try:
        server.hold("h", [4, 5, 9])
        path = await reader.read(
            addr,
            "h",
            [1, 2],
            first_block=1,
            shm_path=str(shared.path),
            src_block_ids=[4, 5, 9],
            shm_shape=list(SHAPE),
        )
        assert path == "shm"
        assert torch.equal(dst[:, [1, 2]], shared.tensor[:, [5, 9]])
        assert await eventually(lambda: released == ["h"])
        with pytest.raises(TransferFailedError, match="shape"):
            await reader.read(
                addr, "h2", [0], shm_path=str(shared.path), src_block_ids=[1], shm_shape=[3, 16, 2, 8, 2, 8]
            )
    finally:
        reader.close()
        await server.stop()
        shared.close()

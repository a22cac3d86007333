"""KV transfer bandwidth: shared memory and TCP between two processes, against memcpy.

A "prefill" process holds a prompt's blocks in a SmolLM2-shaped KV cache (30 layers, 3 KV heads,
head dim 64, bf16, block 16 -> 360 KiB a block) and serves them with the real BlockServer; this
process reads them with the real BlockReader into its own cache, as a decode worker does. memcpy is
one torch copy of the same number of bytes between two preallocated tensors in this process.

    .venv/bin/python benchmarks/bench_transfer.py --tokens 512 2048 8192
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

import torch

from tandem.transfer.client import BlockReader
from tandem.transfer.layout import layout_of
from tandem.transfer.server import BlockServer
from tandem.transfer.shm import SharedKvCache

LAYERS, HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 16


def shape(num_blocks: int) -> tuple[int, ...]:
    return (LAYERS, num_blocks, 2, BLOCK, HEADS, HEAD_DIM)


def serve(num_blocks: int, holds: int, blocks_per_hold: int, conn) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    cache = SharedKvCache(shape(num_blocks), torch.bfloat16)
    cache.tensor.normal_()

    async def main() -> None:
        server = BlockServer(cache.tensor, layout_of(cache.tensor), lambda h: None, shm_path=str(cache.path))
        address = await server.start()
        for i in range(holds):
            server.hold(f"h{i}", list(range(i % 4, i % 4 + blocks_per_hold)))
        conn.send((address, str(cache.path)))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await server.stop()

    asyncio.run(main())
    cache.close()


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.randn(nbytes // 2).to(torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


async def read_gbps(
    address: str, shm_path: str, blocks: int, first_hold: int, repeats: int, via: str, one_sided: bool = False
) -> list[float]:
    """Seconds per read. one_sided: the reader gets the source block ids up front (as a decode
    worker does from the transfer parameters) and copies before any message is exchanged."""
    dst = torch.zeros(shape(blocks + 8), dtype=torch.bfloat16)
    reader = BlockReader(dst, layout_of(dst), prefer_shm=via == "shm")
    out = []
    for i in range(repeats):
        h = first_hold + i
        src_ids = list(range(h % 4, h % 4 + blocks)) if one_sided else None
        src_shape = list(shape(blocks + 8)) if one_sided else None
        t = time.perf_counter()
        dst_ids = list(range(blocks))
        path = await reader.read(
            address, f"h{h}", dst_ids, shm_path=shm_path, src_block_ids=src_ids, shm_shape=src_shape
        )
        out.append(time.perf_counter() - t)
        assert path == via, f"expected {via}, took {path}"
    reader.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    block_bytes = LAYERS * 2 * BLOCK * HEADS * HEAD_DIM * 2
    print(f"KV block: {block_bytes / 1024:.0f} KiB (SmolLM2-135M, bf16, {BLOCK} tokens)")
    print(
        "| prompt tokens | MiB | memcpy GB/s | shm one-sided GB/s (x memcpy) | shm request/reply GB/s "
        "(x memcpy) | TCP GB/s (x memcpy) | one-sided ms | request/reply ms | TCP ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ctx = mp.get_context("spawn")
    for tokens in args.tokens:
        blocks = -(-tokens // BLOCK)
        nbytes = blocks * block_bytes
        holds = 3 * (args.repeats + 1)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(blocks + 8, holds, blocks, child))
        proc.start()
        address, shm_path = parent.recv()
        try:
            warm = asyncio.run(read_gbps(address, shm_path, blocks, 0, 1, "shm"))
            shm = asyncio.run(read_gbps(address, shm_path, blocks, 1, args.repeats, "shm"))
            asyncio.run(read_gbps(address, "", blocks, args.repeats + 1, 1, "tcp"))
            tcp = asyncio.run(read_gbps(address, "", blocks, args.repeats + 2, args.repeats, "tcp"))
            first = 2 * args.repeats + 2
            one = asyncio.run(read_gbps(address, shm_path, blocks, first, args.repeats, "shm", True))
        finally:
            parent.send("stop")
            proc.join(10)
        del warm
        mc = memcpy_gbps(nbytes, args.repeats)
        s, t, o = statistics.median(shm), statistics.median(tcp), statistics.median(one)
        shm_gbps, tcp_gbps, one_gbps = nbytes / s / 1e9, nbytes / t / 1e9, nbytes / o / 1e9
        print(
            f"| {tokens} | {nbytes / 2**20:.1f} | {mc:.1f} | {one_gbps:.2f} ({one_gbps / mc:.2f}x) "
            f"| {shm_gbps:.2f} ({shm_gbps / mc:.2f}x) | {tcp_gbps:.2f} ({tcp_gbps / mc:.2f}x) "
            f"| {o * 1e3:.2f} | {s * 1e3:.2f} | {t * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()

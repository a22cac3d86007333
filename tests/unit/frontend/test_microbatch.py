from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.frontend.microbatch import MicrobatchEncoder


class FakeTokenizer:
    """Ids = character codes (+1000 with special tokens); each batch call blocks until released."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], bool]] = []
        self.release = threading.Event()
        self.fail = False

    def encode_many(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        self.release.wait(5)
        self.batches.append((list(texts), add_special_tokens))
        if self.fail:
            raise RuntimeError("tokenizer exploded")
        return [[ord(c) + (1000 if add_special_tokens else 0) for c in t] for t in texts]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as ex:
        yield ex


async def test_calls_arriving_during_a_batch_share_the_next_one(pool: ThreadPoolExecutor) -> None:
    tok = FakeTokenizer()
    enc = MicrobatchEncoder(tok.encode_many, pool)
    first = asyncio.ensure_future(enc.encode(["a"], False))
    await asyncio.sleep(0.01)  # the first batch is now on the thread, blocked
    later = [
        asyncio.ensure_future(enc.encode(["bc", "d"], False)),
        asyncio.ensure_future(enc.encode(["e"], True)),
        asyncio.ensure_future(enc.encode(["f"], False)),
    ]
    await asyncio.sleep(0.01)
    tok.release.set()
    assert await first == [[97]]
    assert await later[0] == [[98, 99], [100]]
    assert await later[1] == [[1101]]
    assert await later[2] == [[102]]
    # One call for the first, then one per special-token rule for everything that queued behind it.
    assert tok.batches[0] == (["a"], False)
    assert sorted(tok.batches[1:]) == [(["bc", "d", "f"], False), (["e"], True)]


async def test_a_caller_that_left_is_skipped(pool: ThreadPoolExecutor) -> None:
    tok = FakeTokenizer()
    enc = MicrobatchEncoder(tok.encode_many, pool)
    gone = asyncio.ensure_future(enc.encode(["x"], False))
    stays = asyncio.ensure_future(enc.encode(["y"], False))
    await asyncio.sleep(0.01)
    gone.cancel()  # the client disconnected while its prompt was being tokenized
    tok.release.set()
    assert await stays == [[121]]
    assert gone.cancelled()


async def test_an_error_reaches_every_caller_of_the_batch_and_the_next_batch_runs(
    pool: ThreadPoolExecutor,
) -> None:
    tok = FakeTokenizer()
    enc = MicrobatchEncoder(tok.encode_many, pool)
    tok.fail = True
    calls = [asyncio.ensure_future(enc.encode([t], False)) for t in "ab"]
    tok.release.set()
    for call in calls:
        with pytest.raises(RuntimeError, match="exploded"):
            await call
    tok.fail = False
    assert await enc.encode(["z"], False) == [[122]]


async def test_up_to_max_batches_run_at_once(pool: ThreadPoolExecutor) -> None:
    tok = FakeTokenizer()
    enc = MicrobatchEncoder(tok.encode_many, pool, max_batches=2)
    calls = []
    for t in "ab":  # each one alone: "a" and "b" each take a thread
        calls.append(asyncio.ensure_future(enc.encode([t], False)))
        await asyncio.sleep(0.01)
    calls += [asyncio.ensure_future(enc.encode([t], False)) for t in "cd"]  # wait for a free thread
    await asyncio.sleep(0.01)
    tok.release.set()
    assert [await c for c in calls] == [[[97]], [[98]], [[99]], [[100]]]
    assert sorted(tok.batches) == [(["a"], False), (["b"], False), (["c", "d"], False)]


async def test_a_burst_read_in_one_turn_of_the_loop_is_one_batch(pool: ThreadPoolExecutor) -> None:
    """Clients whose requests are readable together: the encoder waits for the loop to read them
    all, so their prompts reach the engine together (one prefill step, not a split batch)."""
    tok = FakeTokenizer()
    tok.release.set()
    enc = MicrobatchEncoder(tok.encode_many, pool, max_batches=2, inline_chars=1000, inline_text_chars=10)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().strip()
        ids = await enc.encode([line], False)
        writer.write(f"{ids[0]}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.05)  # every connection accepted and its handler waiting to read
        for i, (_, writer) in enumerate(conns):
            writer.write(f"{'wxyz'[i]}\n".encode())  # sent back to back, before the loop runs
        replies = [(await reader.readline()).decode().strip() for reader, _ in conns]
        for _, writer in conns:
            writer.close()
    assert replies == ["[119]", "[120]", "[121]", "[122]"]
    assert len(tok.batches) == 1 and sorted(tok.batches[0][0]) == ["w", "x", "y", "z"]


async def test_small_batches_run_on_the_loop_and_large_ones_on_a_thread(pool: ThreadPoolExecutor) -> None:
    threads: list[str] = []

    def encode_many(texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        threads.append(threading.current_thread().name)
        return [[len(t)] for t in texts]

    enc = MicrobatchEncoder(encode_many, pool, inline_chars=10, inline_text_chars=5)
    loop_thread = threading.current_thread().name
    assert await asyncio.gather(enc.encode(["abc"], False), enc.encode(["defg"], False)) == [[[3]], [[4]]]
    assert threads == [loop_thread]  # 7 characters, none over 5: one call, on the loop
    assert await asyncio.gather(enc.encode(["abcdef"], False), enc.encode(["ghijk"], True)) == [[[6]], [[5]]]
    assert len(threads) == 3 and loop_thread not in threads[1:]  # 11 characters: a thread
    assert await enc.encode(["abcdef"], False) == [[6]]
    assert len(threads) == 4 and threads[3] != loop_thread  # 6 characters, but one text over 5


async def test_an_error_on_the_loop_reaches_every_caller(pool: ThreadPoolExecutor) -> None:
    tok = FakeTokenizer()
    tok.release.set()
    tok.fail = True
    enc = MicrobatchEncoder(tok.encode_many, pool, inline_chars=100, inline_text_chars=10)
    calls = [asyncio.ensure_future(enc.encode([t], False)) for t in "ab"]
    for call in calls:
        with pytest.raises(RuntimeError, match="exploded"):
            await call
    tok.fail = False
    assert await enc.encode(["z"], False) == [[122]]

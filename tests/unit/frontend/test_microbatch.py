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
    calls = [asyncio.ensure_future(enc.encode([t], False)) for t in "abcd"]
    await asyncio.sleep(0.01)  # "a" and "b" each took a thread; "c" and "d" wait for a free one
    tok.release.set()
    assert [await c for c in calls] == [[[97]], [[98]], [[99]], [[100]]]
    assert sorted(tok.batches) == [(["a"], False), (["b"], False), (["c", "d"], False)]

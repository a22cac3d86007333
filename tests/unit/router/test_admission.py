"""AdmissionQueue: first come first served, bounded in size and time, hands the turn on."""

from __future__ import annotations

import asyncio

import pytest

from tandem.protocol.errors import BusyError, InvalidRequestError, OverloadedError
from tandem.router.admission import AdmissionQueue, AdmissionQueues


class Room:
    """`free` places a request can take; try_place takes one or raises BusyError."""

    def __init__(self, free: int) -> None:
        self.free = free

    def taker(self, name: str):
        def try_place() -> str:
            if self.free <= 0:
                raise BusyError("all busy")
            self.free -= 1
            return name

        return try_place


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_places_at_once_when_there_is_room_and_nobody_waits() -> None:
    q, room = AdmissionQueue(4), Room(1)
    assert await q.place(room.taker("a")) == "a"
    assert q.waiting == 0 and q.queued_total == 0


async def test_waiters_are_placed_in_arrival_order_as_room_frees() -> None:
    q, room = AdmissionQueue(8, timeout=5), Room(0)
    tasks = [asyncio.create_task(q.place(room.taker(n))) for n in "abc"]
    await settle()
    assert q.waiting == 3 and not any(t.done() for t in tasks)
    placed = []
    for _ in range(3):
        room.free += 1
        q.notify()
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        placed += [t.result() for t in done]
        tasks = [t for t in tasks if not t.done()]
    assert placed == ["a", "b", "c"] and q.waiting == 0 and q.queued_total == 3


async def test_a_new_request_does_not_jump_the_line() -> None:
    q, room = AdmissionQueue(8, timeout=5), Room(0)
    first = asyncio.create_task(q.place(room.taker("first")))
    await settle()
    room.free = 1  # room appears, but the head has not been told yet
    late = asyncio.create_task(q.place(room.taker("late")))
    await settle()
    assert not late.done(), "room went to the newcomer instead of the head of the line"
    q.notify()
    assert await first == "first"
    room.free += 1
    q.notify()
    assert await late == "late"


async def test_room_for_several_wakes_them_one_after_another() -> None:
    q, room = AdmissionQueue(8, timeout=5), Room(0)
    tasks = [asyncio.create_task(q.place(room.taker(n))) for n in "abc"]
    await settle()
    room.free = 3
    q.notify()  # one notification: each placed head hands the turn to the next
    assert await asyncio.wait_for(asyncio.gather(*tasks), 1.0) == ["a", "b", "c"]


async def test_a_full_queue_refuses_at_once() -> None:
    q, room = AdmissionQueue(1, timeout=5), Room(0)
    waiting = asyncio.create_task(q.place(room.taker("a")))
    await settle()
    with pytest.raises(OverloadedError, match="1 requests are already waiting"):
        await q.place(room.taker("b"))
    assert q.full_total == 1 and q.waiting == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert q.waiting == 0


async def test_a_wait_past_the_timeout_is_refused() -> None:
    q, room = AdmissionQueue(4, timeout=0.15, poll=0.02), Room(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(OverloadedError, match=r"stayed busy for 0\.15 s"):
        await q.place(room.taker("a"))
    assert 0.14 <= loop.time() - t0 < 1.0
    assert q.timeouts_total == 1 and q.waiting == 0 and q.wait_seconds_total >= 0.14


async def test_the_head_polls_without_a_notification() -> None:
    """Room can appear without a request ending here (a worker joined, a load entry expired)."""
    q, room = AdmissionQueue(4, timeout=5, poll=0.02), Room(0)
    task = asyncio.create_task(q.place(room.taker("a")))
    await asyncio.sleep(0.05)
    room.free = 1
    assert await asyncio.wait_for(task, 1.0) == "a"


async def test_a_departing_head_hands_the_turn_to_the_next() -> None:
    q, room = AdmissionQueue(4, timeout=5, poll=10), Room(0)
    head = asyncio.create_task(q.place(room.taker("head")))
    second = asyncio.create_task(q.place(room.taker("second")))
    await settle()
    room.free = 1
    head.cancel()  # its client went away just as room appeared
    await asyncio.gather(head, return_exceptions=True)
    assert await asyncio.wait_for(second, 1.0) == "second"


async def test_other_errors_propagate_and_leave_the_line() -> None:
    q, room = AdmissionQueue(4, timeout=5), Room(0)
    fail = {"now": False}

    def try_place() -> str:
        if fail["now"]:
            raise InvalidRequestError("the model went away")
        return room.taker("x")()

    task = asyncio.create_task(q.place(try_place))
    await settle()
    fail["now"] = True
    q.notify()
    with pytest.raises(InvalidRequestError):
        await task
    assert q.waiting == 0


async def test_pools_wait_in_separate_lines() -> None:
    """Disaggregated serving: a request waiting for a decode worker must not hold up a prefill."""
    queues = AdmissionQueues(4, timeout=5)
    decode_room, prefill_room = Room(0), Room(1)
    waiting = asyncio.create_task(queues.pool("decode").place(decode_room.taker("decode leg")))
    await settle()
    assert await queues.pool("prefill").place(prefill_room.taker("prefill leg")) == "prefill leg"
    assert not waiting.done() and queues.pool("decode").waiting == 1
    decode_room.free = 1
    queues.pool("decode").notify()
    assert await waiting == "decode leg"
    assert sorted(queues.pools) == ["decode", "prefill"]


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_waiting"):
        AdmissionQueue(0)
    with pytest.raises(ValueError, match="timeout"):
        AdmissionQueue(1, timeout=0)
    with pytest.raises(ValueError, match="max_waiting"):
        AdmissionQueues(0)  # checked when made, not on first use

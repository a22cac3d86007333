"""Clocks for the simulated engine: real time for serving, virtual time for simulations."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from typing import Protocol

_PR_SET_TIMERSLACK = 29


class Clock(Protocol):
    def now(self) -> float: ...

    def wait(self, seconds: float) -> None:
        """Let `seconds` pass (sleep on a real clock, jump on a virtual one)."""
        ...


class RealClock:
    def __init__(self) -> None:
        self._tight = threading.local()

    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            if not getattr(self._tight, "done", False):
                self._tight.done = True
                tighten_timer_slack()
            time.sleep(seconds)


def tighten_timer_slack() -> None:
    """Let this thread's sleeps end within ~1 us of their deadline instead of Linux's default 50 us
    of slack, so a simulated step ends when its timing model says (measured: a 18 ms sleep overshot
    by 107 us at the median, 59 us with this). By hand: the standard library has no prctl."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):  # no libc to load: keep the default slack
        pass


class VirtualClock:
    """Time moves only when told to, so an hour of trace runs as fast as the scheduler can go."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self.t += seconds

    def advance_to(self, t: float) -> None:
        self.t = max(self.t, t)

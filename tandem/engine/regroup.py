"""RegroupHold: when nothing decodes, when to let new prompts start (`EngineConfig.regroup_steps`).

    hold = RegroupHold(steps=2.0, window_steps=2.0)
    hold.decode_step(seconds)          # after each step that computed no prompt tokens
    hold.finished(now)                 # each request that finished here (not one handed to a peer)
    until = hold.until(arrivals, now)  # None: start the waiting prompts now; else hold them until then

Why: a closed loop's clients send their next requests as their last ones end, and a frontend takes
them in one by one over a few ms. Started at once, the first would prefill alone and the rest would
wait a whole prefill step behind it, so a batch that ended together would not prefill together again.
So while fewer prompts have arrived than requests finished within the window before the oldest of
them, the prompts wait, at most the limit after the oldest arrived.
"""

from __future__ import annotations

from collections import deque


class RegroupHold:
    def __init__(self, steps: float, window_steps: float) -> None:
        """`steps`: the limit, and `window_steps`: how long before the oldest waiting prompt a finish
        still counts, both in multiples of the last decode step's duration."""
        self.steps = steps
        self.window_steps = window_steps
        self.decode_seconds = 0.0
        """The executor's duration of the last step that computed no prompt tokens."""
        self._finishes: deque[float] = deque()

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def decode_step(self, seconds: float) -> None:
        self.decode_seconds = seconds

    def finished(self, now: float) -> None:
        self._finishes.append(now)

    def forget_before(self, now: float) -> None:
        """Drop finishes no hold can count any more (older than a limit and a window)."""
        horizon = (self.steps + self.window_steps) * self.decode_seconds
        while self._finishes and now - self._finishes[0] > horizon:
            self._finishes.popleft()

    def until(self, arrivals: list[float], now: float) -> float | None:
        """When the prompts that arrived at `arrivals` may start (None: now)."""
        limit = self.steps * self.decode_seconds
        if not limit or not arrivals or not self._finishes:
            return None
        oldest = min(arrivals)
        if now >= oldest + limit:
            return None
        window = self.window_steps * self.decode_seconds
        finished = [t for t in self._finishes if t >= oldest - window]
        if not finished:
            return None
        if sum(1 for t in arrivals if t >= finished[0]) >= len(finished):
            return None
        return oldest + limit

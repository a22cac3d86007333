"""RegroupHold: when nothing decodes, when to let new prompts start (`EngineConfig.regroup_steps`).

    hold = RegroupHold(steps=2.0, window_steps=2.0, expect_steps=4.0, pace_steps=4.0)
    hold.decode_step(seconds)          # after each step that computed no prompt tokens
    hold.finished(now)                 # each request that finished here (not one handed to a peer)
    hold.expect(request_id, now)       # a router says this request is on its way here
    hold.arrived(request_id)           # ... and here it is
    until = hold.until(arrivals, now)  # None: start the waiting prompts now; else hold them until then

Why: a closed loop's clients send their next requests as their last ones end, and a frontend takes
them in one by one over a few ms. Started at once, the first would prefill alone and the rest would
wait a whole prefill step behind it, so a batch that ended together would not prefill together again.
So while fewer prompts have arrived than requests finished within the window before the oldest of
them, the prompts wait, at most the limit after the oldest arrived.

The limit stretches, up to `pace_steps`, when the turnover is in sight: at the pace its prompts have
come so far (the mean gap between them), the missing ones are due by then. A c=16 closed loop's
replacements reach the engine ~1.5 ms apart, as fast as the client sends them; the last of eight
often came 0.5-3 ms past the 2-step limit and waited a whole prefill step. A c=64 turnover (32
prompts over 20-80 ms) is not due within any such limit, so it is not held longer.

A router that picks the worker when a request reaches the frontend, before its chat template and
tokenization, announces it (`expect`). The hold then knows what is on its way instead of guessing:
when the prompts that arrived and the ones announced make up the whole turnover, it waits for the
announced ones up to the longer `expect_steps` limit. The 2-step guess alone splits a turnover whose
last prompts the frontend takes in a few ms late (a c=16 closed loop: docs/benchmarks.md, session 15);
it does not wait longer for a turnover that is not in sight (a c=64 one comes in over 20-80 ms).
"""

from __future__ import annotations

from collections import deque

LAG_WEIGHT = 0.25
"""Weight of the newest sample in the moving average of announcement-to-arrival times."""
MAX_EXPECTED = 4096
"""Announcements kept at most (the oldest go first): a bound, whatever the routers send."""


class RegroupHold:
    def __init__(
        self, steps: float, window_steps: float, expect_steps: float = 0.0, pace_steps: float = 0.0
    ) -> None:
        """`steps`: the limit; `window_steps`: how long before the oldest waiting prompt a finish
        still counts; `expect_steps`: the limit while announced prompts complete a turnover (and
        the window for its finishes); `pace_steps`: the limit while the missing prompts are due by
        then at the pace the others came. All in multiples of the last decode step's duration."""
        self.steps = steps
        self.window_steps = window_steps
        self.expect_steps = expect_steps
        self.pace_steps = pace_steps
        self.decode_seconds = 0.0
        """The executor's duration of the last step that computed no prompt tokens."""
        self._finishes: deque[float] = deque()
        self._expected: dict[str, float] = {}
        """Announced request id -> when the announcement came (dropped on arrival, or when stale)."""
        self.lag: float | None = None
        """How long announced requests took to arrive after their announcement (moving average)."""

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def decode_step(self, seconds: float) -> None:
        self.decode_seconds = seconds

    def finished(self, now: float) -> None:
        self._finishes.append(now)

    @property
    def takes_announcements(self) -> bool:
        return self.enabled and self.expect_steps > 0

    def expect(self, request_id: str, now: float) -> None:
        if self.takes_announcements:
            if len(self._expected) >= MAX_EXPECTED:
                del self._expected[next(iter(self._expected))]
            self._expected[request_id] = now

    def arrived(self, request_id: str, now: float) -> None:
        if self._expected:
            announced = self._expected.pop(request_id, None)
            if announced is not None:
                lag = max(0.0, now - announced)
                self.lag = lag if self.lag is None else self.lag + LAG_WEIGHT * (lag - self.lag)

    @property
    def num_expected(self) -> int:
        return len(self._expected)

    def forget_before(self, now: float) -> None:
        """Drop finishes no hold can count any more (older than a limit and a window), and
        announcements whose request did not come within the longer limit (refused by the frontend,
        or its client left)."""
        longest = max(self.steps, self.expect_steps, self.pace_steps)
        horizon = (longest + max(self.window_steps, self.expect_steps)) * self.decode_seconds
        while self._finishes and now - self._finishes[0] > horizon:
            self._finishes.popleft()
        if self._expected:
            stale = now - self.expect_steps * self.decode_seconds
            for rid in [rid for rid, t in self._expected.items() if t < stale]:
                del self._expected[rid]

    def until(self, arrivals: list[float], now: float) -> float | None:
        """When the prompts that arrived at `arrivals` may start (None: now)."""
        limit = self.steps * self.decode_seconds
        if not limit or not arrivals or not self._finishes:
            return None
        oldest = min(arrivals)
        if self._expected:
            held = self._until_announced(arrivals, oldest, now)
            if held is not None:
                return held
        window = self.window_steps * self.decode_seconds
        finished = [t for t in self._finishes if t >= oldest - window]
        if not finished:
            return None
        come = sorted(t for t in arrivals if t >= finished[0])
        if len(come) >= len(finished):
            return None
        until = max(oldest + limit, self._due_at_pace(come, len(finished) - len(come), oldest))
        return None if now >= until else until

    def _due_at_pace(self, come: list[float], missing: int, oldest: float) -> float:
        """When the `missing` prompts are due, one gap late, at the mean gap between the ones that
        came (sorted); 0.0 if not within the pace limit after the oldest (or too few came to tell)."""
        if len(come) < 2 or self.pace_steps <= self.steps:
            return 0.0
        gap = (come[-1] - come[0]) / (len(come) - 1)
        due = come[-1] + (missing + 1) * gap
        return due if due <= oldest + self.pace_steps * self.decode_seconds else 0.0

    def _until_announced(self, arrivals: list[float], oldest: float, now: float) -> float | None:
        """The longer hold: the arrived and the announced prompts make up the turnover, and at the
        usual lag the last announced one comes within the short limit (the longer one is slack for
        its lateness, not a wait worth planning on)."""
        limit = self.expect_steps * self.decode_seconds
        if now >= oldest + limit:
            return None
        stale = now - limit
        announced = [t for t in self._expected.values() if t >= stale]
        finished = [t for t in self._finishes if t >= oldest - limit]
        if not announced or not finished:
            return None
        arrived = sum(1 for t in arrivals if t >= finished[0])
        if arrived >= len(finished) or arrived + len(announced) < len(finished):
            return None
        # The last announced prompt, at the usual lag, would come after the short limit: the turnover
        # is not about to be whole, and waiting would only delay the ones here. (Traced in a c=64
        # closed loop: a 32-request turnover all announced with 17 prompts still to tokenize.)
        if max(announced) + (self.lag or 0.0) > oldest + self.steps * self.decode_seconds:
            return None
        return oldest + limit

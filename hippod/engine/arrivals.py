"""Which requests the daemon said are right behind the ones a runner already has.

Requests that reach hippod together reach its runner a little apart: each comes over its own
socket, after the daemon has done its part for the ones before it. Admitting whatever has come
would split a burst into two or three batched prefills (1+7, 2+6, ...) where raw mlx_lm pays one.
A fixed wait window would cost every lone request that wait.

So the daemon numbers the requests it sends a runner (1, 2, ...) and tells each one how many it
had numbered when it sent it. A number the runner has not seen yet, at or below the highest count
it was told, is a request on its way: admission waits for it, `hold` seconds from when it began
waiting or from the last one that came since (a burst of 32 takes the daemon longer than one hold
to send), never more than `max_hold` in all, so a request that died on the way costs the others
only that. A request with nothing numbered behind it (a lone one) never waits. Numbers may come
in any order.
"""

from __future__ import annotations

import time

HOLD_SECONDS = 0.025  # how long admission waits for the next of the requests on their way
MAX_HOLD_SECONDS = 0.1  # ... and the most it waits in all while they keep coming


class Arrivals:
    def __init__(self, hold: float = HOLD_SECONDS, clock=time.monotonic,
                 max_hold: float = MAX_HOLD_SECONDS):
        self.hold = hold
        self.max_hold = max(max_hold, hold)
        self.clock = clock
        self.began: float | None = None  # when the current wait began
        self.settled = 0  # every number up to this one came (or was given up on)
        self.seen: set[int] = set()  # numbers above `settled` that came
        self.told = 0  # the most requests the daemon said it had numbered
        self.deadline: float | None = None
        self.waits = 0  # admissions that waited for requests on their way
        self.given_up = 0  # numbered requests that never came within `hold`

    def came(self, number: int, told: int) -> None:
        """A request arrived: its number (0: not numbered) and the count it was sent with."""
        if number <= 0:
            return
        self.told = max(self.told, told, number)
        if number > self.settled and number not in self.seen:
            if self.deadline is not None:  # one more of those waited for: wait on for the next
                self.deadline = min(self.clock() + self.hold, self.began + self.max_hold)
            self.seen.add(number)
            while self.settled + 1 in self.seen:
                self.settled += 1
                self.seen.discard(self.settled)

    @property
    def missing(self) -> int:
        return self.told - self.settled - len(self.seen)

    def wait(self) -> float:
        """Seconds admission should still wait for requests on their way; 0: admit now."""
        if self.missing <= 0:
            self.deadline = None
            return 0.0
        now = self.clock()
        if self.deadline is None:
            self.began, self.deadline = now, now + self.hold
            self.waits += 1
        if now >= self.deadline:
            self.given_up += self.missing
            self.settled, self.seen, self.deadline = self.told, set(), None
            return 0.0
        return self.deadline - now

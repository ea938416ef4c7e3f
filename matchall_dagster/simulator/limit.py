"""The account's request limit as the simulator enforces it, and how its statistics count requests."""

from __future__ import annotations

import math
from collections import deque


class RequestLimit:
    """Whole requests in any one second (as the client counts them); below 1/s, one per 1/rate s.

    The rate is passed on every call, not kept, because a benchmark swaps a running simulator's
    configuration. Not thread-safe: the simulator calls it under its lock.
    """

    def __init__(self) -> None:
        self._admitted: deque[float] = deque()

    def over(self, arrival: float, rate: float) -> bool:
        """Whether a request arriving at `arrival` (monotonic seconds) exceeds `rate` requests a
        second (0: no limit); if not, it counts towards the limit from now on."""
        if rate <= 0:
            return False
        limit, window = (math.floor(rate), 1.0) if rate >= 1 else (1, 1 / rate)
        while self._admitted and self._admitted[0] <= arrival - window:
            self._admitted.popleft()
        if len(self._admitted) >= limit:
            return True
        self._admitted.append(arrival)
        return False


def max_in_window(sorted_times: list[float], window: float) -> int:
    """The most events that fall within any half-open interval of `window` seconds."""
    best = 0
    start = 0
    for end, moment in enumerate(sorted_times):
        while sorted_times[start] <= moment - window:
            start += 1
        best = max(best, end - start + 1)
    return best

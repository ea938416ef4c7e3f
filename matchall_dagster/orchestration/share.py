"""The sensors' share of the account's rate, spaced across ticks and sensors of this process.

Each tick builds a new client whose rate limiter starts empty; without the gate, the last request
of one tick and the first of the next could fall within one second. The daemon evaluates the
sensors one at a time (dagster.yaml: no `use_threads`), so one gate per process suffices. A later
change replaces this with an account-wide budget.

`SENSOR_REQUESTS_PER_SECOND` is read here at each use: tests and benchmarks that speed the
requests up set it on this module (the tick's request budget, `REQUESTS_PER_TICK`, stays).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from matchall_dagster.lifecycle.policy import SENSOR_REQUESTS_PER_SECOND

__all__ = ["SENSOR_REQUESTS_PER_SECOND", "ShareGate", "requests_per_second", "share_gate"]


def requests_per_second() -> float:
    """The sensors' share now (see the module's note on setting it)."""
    return SENSOR_REQUESTS_PER_SECOND


class ShareGate:
    """Spaces requests at the sensors' share: one request per turn, turns 1/share seconds apart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_done = -math.inf

    def wait(self) -> None:
        with self._lock:
            delay = self._last_done + 1.0 / requests_per_second() + 0.015 - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def done(self) -> None:
        with self._lock:
            self._last_done = time.monotonic()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for the turn, then hold it for one request; the next turn counts from its end."""
        self.wait()
        try:
            yield
        finally:
            self.done()


share_gate = ShareGate()

"""The readiness cursor alone: its size at 10,000 waiting runs, its round trip, the version-2 cursors
it still reads, and the clean reset when it cannot."""

from __future__ import annotations

import logging
import math
import random

import pytest

from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.lifecycle.policy import MAX_POLL_DELAY

LOG = logging.getLogger("test")
# Written by the version-2 cursor (compressed numpy columns) before this format.
VERSION_2 = '{"v":2,"after":7,"n":2,"base":1800000001,"waiting":"eJxjZYAARgYESAZiJkYAAwUAbQ=="}'


def waiting_runs(count: int, first_id: int) -> dict[int, tuple[float, int]]:
    rng = random.Random(1)
    now = 1_800_000_000.0
    return {
        storage_id: (now + rng.uniform(0, MAX_POLL_DELAY), rng.randint(1, 14))
        for storage_id in sorted(rng.sample(range(first_id, first_id + 4 * count), count))
    }


@pytest.mark.parametrize("first_id", [1, 50_000_000])  # a new instance, and one with a long history
def test_10000_waiting_runs_fit_in_a_cursor_of_under_80_kb(first_id: int) -> None:
    waiting = waiting_runs(10_000, first_id)
    raw = ReadinessCursor(after=first_id + 40_000, waiting=waiting).dump()
    # Measured: 72 KB (7.2 bytes a run) either way; the module's docstring states it, with the limits.
    assert len(raw) < 80_000
    back = ReadinessCursor.load(raw, LOG)
    assert back.after == first_id + 40_000
    assert back.waiting.keys() == waiting.keys()
    for storage_id, (next_poll_at, polls) in waiting.items():
        assert back.waiting[storage_id] == (math.ceil(next_poll_at), polls)  # due times in whole seconds


def test_an_empty_cursor_round_trips_and_stays_small() -> None:
    assert ReadinessCursor.load(ReadinessCursor().dump(), LOG) == ReadinessCursor()
    one = ReadinessCursor(after=12, waiting={10: (1_800_000_000.2, 3)})
    assert ReadinessCursor.load(one.dump(), LOG) == ReadinessCursor(after=12, waiting={10: (1_800_000_001.0, 3)})
    assert len(one.dump()) < 120


def test_a_version_2_cursor_is_still_read() -> None:
    cursor = ReadinessCursor.load(VERSION_2, LOG)
    assert cursor == ReadinessCursor(after=7, waiting={5: (1_800_000_001.0, 2), 6: (1_800_000_100.0, 1)})
    assert '"v":3' in cursor.dump()  # written in the current version only


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        '{"observations": "x", "pending": [{"segment_id": "1"}]}',  # the version-1 cursor
        '{"v": 2, "after": 5, "n": 3, "base": 0, "waiting": "AAAA"}',
        '{"v": 2, "after": "five"}',
        '{"v": 3, "after": 5, "waiting": "AAAA"}',
        '{"v": 3, "after": 5, "waiting": 5}',
        '{"v": 4, "after": 5}',
    ],
)
def test_an_unreadable_cursor_resets_cleanly(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    assert ReadinessCursor.load(raw, LOG) == ReadinessCursor()
    assert "could not be read" in caplog.text
    assert ReadinessCursor.load(None, LOG) == ReadinessCursor()

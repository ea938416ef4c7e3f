"""The readiness policy alone: `decide`, `plan`, the backoff, and the schedule under load in
simulated time (no Dagster instance, no server)."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from matchall_dagster.api.models import MatchAllRun, RunState, RunStatus
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.lifecycle.policy import (
    FIRST_POLL_DELAY,
    MAX_POLL_DELAY,
    Due,
    PendingRun,
    Step,
    backed_off,
    decide,
    pending_run,
    plan,
    poll_delay,
)
from matchall_dagster.lifecycle.record import PendingRecord

LOG = logging.getLogger("test")


def pending(**changes: Any) -> PendingRun:
    return PendingRun(segment_id="7", run_id="r", sort="id", started_at=0.0, **changes)


def status(state: RunState) -> RunStatus:
    run = MatchAllRun(
        run_id="r",
        run_id_start=datetime(2026, 1, 1, tzinfo=UTC),
        run_id_end=None if state is RunState.RUNNING else datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        is_ready=state is RunState.READY,
        segment_id="7",
    )
    return RunStatus(state=state, run=None if state is RunState.EXPIRED else run)


@pytest.mark.parametrize(
    ("state", "attempt", "step"),
    [
        (RunState.READY, 1, Step.MATERIALIZE),
        (RunState.EXPIRED, 1, Step.EXPIRED),
        (RunState.FAILED, 1, Step.RESTART),
        (RunState.FAILED, 3, Step.GIVE_UP),
        (RunState.RUNNING, 1, Step.WAIT),
    ],
)
def test_decide(state: RunState, attempt: int, step: Step) -> None:
    assert decide(pending(attempt=attempt), status(state), now=100.0, max_attempts=3).step is step


def test_polls_back_off_with_the_run_s_age() -> None:
    run = pending(next_poll_at=FIRST_POLL_DELAY)
    polled_at = []
    while run.next_poll_at < 3_600:
        polled_at.append(run.next_poll_at)
        run = decide(run, status(RunState.RUNNING), now=run.next_poll_at, max_attempts=3).run
    assert polled_at[:6] == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0]  # soon after the start, then less often
    assert run.polls == len(polled_at) == 12  # an hour-long run costs a dozen polls
    assert poll_delay(10**6) == MAX_POLL_DELAY
    late = backed_off(pending(), now=3_000.0)  # first polled late: not again seconds later
    assert late.next_poll_at == 3_000.0 + MAX_POLL_DELAY


def due(at: float, storage_id: int, fresh: bool = False) -> Due:
    return Due(at, storage_id, fresh)


def test_plan_polls_the_oldest_due_first_within_the_budget() -> None:
    waiting = [due(50, 1), due(10, 2), due(500, 3), due(30, 4)]
    fresh = [due(20, 10, True), due(40, 11, True), due(45, 12, True), due(200, 13, True)]
    chosen = plan(waiting, fresh, now=100, budget=4)
    assert [item.storage_id for item in chosen] == [2, 10, 4, 11]
    everything = plan(waiting, fresh, now=100, budget=100)
    assert [item.storage_id for item in everything] == [2, 10, 4, 11, 12, 1]  # 3 and 13 are not due


def test_plan_takes_new_records_in_log_order() -> None:
    # A record written late but due early does not jump the ones before it: the taken ones stay a
    # prefix of the log, so the cursor needs only the last one taken.
    fresh = [due(30, 10, True), due(10, 11, True), due(35, 12, True)]
    chosen = plan([due(31, 1)], fresh, now=100, budget=2)
    assert [item.storage_id for item in chosen] == [10, 11]
    assert [item.storage_id for item in plan([], fresh, now=32, budget=10)] == [10, 11]


def simulate(
    runs: int, ready_after: list[float], *, kickoff_rate: float, tick_seconds: float, budget: int
) -> dict[str, float]:
    """The sensor's scheduling (plan, decide, the cursor's round trip) against runs that start at
    the kick-off's rate and turn ready after the given delays, in simulated time.

    Returns the most ticks a due run waited for its poll, how far beyond its turn that is (its turn:
    floor(runs due before it, when it became due / budget) ticks), the polls per run, and the
    worst delay from ready to requested.
    """
    started = [i / kickoff_rate for i in range(runs)]
    cursor = ReadinessCursor()
    polls = [0] * runs
    first_seen: dict[tuple[int, float], tuple[int, int]] = {}  # (run, due) -> (tick, rank then)
    worst_wait_ticks = worst_excess = worst_delay = 0.0
    done = 0
    ticks = 0
    while done < runs:
        ticks += 1
        now = ticks * tick_seconds
        after = -1 if cursor.after is None else cursor.after
        new = [Due(started[i], i, True) for i in range(after + 1, runs) if started[i] <= now]
        waiting = [Due(at, i, False) for i, (at, _) in cursor.waiting.items()]
        everything_due = plan(waiting, new, now, budget=runs)
        for rank, item in enumerate(everything_due):
            first_seen.setdefault((item.storage_id, item.due_at), (ticks, rank))
        chosen = plan(waiting, new[:budget], now, budget)  # the sensor reads `budget` new records a tick
        assert chosen == everything_due[:budget]
        for item in chosen:
            i = item.storage_id
            seen_tick, rank = first_seen[(i, item.due_at)]
            worst_wait_ticks = max(worst_wait_ticks, ticks - seen_tick)
            worst_excess = max(worst_excess, ticks - seen_tick - rank // budget)
            run = PendingRun("s", str(i), "id", started_at=started[i], storage_id=i, polls=polls[i])
            ready = now >= started[i] + ready_after[i]
            decision = decide(run, status(RunState.READY if ready else RunState.RUNNING), now, max_attempts=3)
            polls[i] += 1
            if item.fresh:
                cursor.after = i
            cursor.waiting.pop(i, None)
            if decision.step is Step.WAIT:
                cursor.waiting[i] = (decision.run.next_poll_at, decision.run.polls)
            else:
                done += 1
                worst_delay = max(worst_delay, now - (started[i] + ready_after[i]))
        cursor = ReadinessCursor.load(cursor.dump(), LOG)
    return {
        "worst_wait_ticks": worst_wait_ticks,
        "worst_excess_ticks": worst_excess,
        "polls_per_run": sum(polls) / runs,
        "max_polls": max(polls),
        "worst_delay": worst_delay,
    }


def test_under_load_every_due_run_is_polled_in_turn_and_polls_stay_few() -> None:
    """1,000 runs started at the kick-off's 4/s, polled at 24 a tick: the sensor is the bottleneck."""
    rng = random.Random(3)
    ready_after = [rng.choice([1.0, 3.0, 30.0, 300.0, 1_800.0]) for _ in range(1_000)]
    result = simulate(1_000, ready_after, kickoff_rate=4.0, tick_seconds=30.0, budget=24)
    assert result["worst_excess_ticks"] == 0  # never later than its turn
    assert result["worst_wait_ticks"] > 10  # and the sensor was the bottleneck
    assert result["polls_per_run"] < 2.0
    assert result["max_polls"] <= 8


def test_when_polls_keep_up_runs_are_requested_soon_after_they_turn_ready() -> None:
    rng = random.Random(4)
    ready_after = [rng.uniform(1, 3_600) for _ in range(200)]
    result = simulate(200, ready_after, kickoff_rate=4.0, tick_seconds=30.0, budget=24)
    assert result["worst_excess_ticks"] == 0
    assert result["polls_per_run"] < 12  # about log2(age / 5 s) each, at most a poll every 10 minutes
    # Ready at most one backoff (capped at 10 minutes) and a tick before being requested.
    assert result["worst_delay"] <= MAX_POLL_DELAY + 2 * 30.0


def test_a_record_s_run_is_due_at_once_and_never_starts_in_the_future() -> None:
    record = PendingRecord(run_id="r", sort="id", run_started_at=1_000.0, attempt=2, kickoff="k", segment_name="N")
    run = pending_run("7", record, storage_id=42, recorded_at=999.0, now=1_010.0)
    assert (run.started_at, run.next_poll_at, run.storage_id, run.attempt, run.kickoff) == (
        1_000.0,
        1_000.0,
        42,
        2,
        "k",
    )
    ahead = pending_run("7", record, storage_id=42, recorded_at=999.0, now=900.0)  # the API's clock is ahead
    assert ahead.started_at == ahead.next_poll_at == 900.0
    unknown = pending_run("7", PendingRecord(run_id="r", sort="id"), storage_id=1, recorded_at=950.0, now=1_000.0)
    assert unknown.started_at == 950.0  # no start time recorded: the record's own time

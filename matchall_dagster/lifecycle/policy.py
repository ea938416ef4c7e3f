"""The readiness policy: when a pending run is polled, and what its polled status leads to.

Pure: a pending run and its status in, the next step out (`decide`); the runs due in, the ones to
poll this tick out (`plan`). The readiness sensor only wires the event log, the cursor and the
clock around them, so the figures below are tested without Dagster.

Scale (10,000 pending runs; the sensors' requests go first in the account's budget): a tick sends
at most `REQUESTS_PER_TICK` requests and ends within `TICK_DEADLINE_SECONDS`; each run is polled
soon after it starts, then less often (the wait doubles the run's age, up to 10 minutes); the due
runs are polled oldest-due first, so a run waits at most ceil(runs due before it / REQUESTS_PER_TICK) ticks.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from matchall_dagster.api.models import RunState, RunStatus
from matchall_dagster.lifecycle.record import PendingRecord

# The account's limit (api.budget keeps it for every process); the sensors' requests go first.
ACCOUNT_REQUESTS_PER_SECOND = 5.0
# A tick polls at most this share of the account's budget over its window: polls go first, and
# this cap keeps a fifth for reads even while thousands of runs are due. It reserves nothing:
# reads take whatever the polls leave.
POLL_SHARE = 0.8
# Dagster ends a sensor evaluation after 60 s; ours end within 40 s. No request starts after
# POLL_WINDOW_SECONDS; one takes at most SENSOR_REQUEST_TIMEOUT (no retry inside a tick: a failed
# poll is due again in a later one) after at most 1 s in the budget (due first); the event-log reads
# before and after are a few bounded queries. 24 + 1 + 8 = 33 s, leaving 7 s for the rest.
TICK_DEADLINE_SECONDS = 40.0
POLL_WINDOW_SECONDS = 24.0
SENSOR_REQUEST_TIMEOUT = 8.0
# The requests of a tick: the polls' share over the poll window (4/s x 24 s = 96). Fixed at import,
# so that a benchmark may speed the clock of the requests up without changing what a tick may send.
REQUESTS_PER_TICK = math.floor(POLL_SHARE * ACCOUNT_REQUESTS_PER_SECOND * POLL_WINDOW_SECONDS)
FIRST_POLL_DELAY = 5.0
MAX_POLL_DELAY = 600.0
UNAVAILABLE_STOPS_TICK = 3  # consecutive 429/5xx/network failures: the API is struggling, stop for now


@dataclass(frozen=True)
class PendingRun:
    """A started run waiting to be ready, as its pending-run record and the sensor's polls say."""

    segment_id: str
    run_id: str
    sort: str
    started_at: float  # epoch seconds: the API's run_id_start (never later than the sensor's clock)
    storage_id: int = 0  # the event-log id of the run's pending-run record
    attempt: int = 1
    polls: int = 0
    next_poll_at: float = 0.0
    kickoff: str | None = None
    segment_name: str | None = None
    alone: bool = False  # read in a run of its own, never in a batch (PendingRecord.alone)


def pending_run(segment_id: str, record: PendingRecord, storage_id: int, recorded_at: float, now: float) -> PendingRun:
    """The run a pending-run record holds, due at once: by the time a tick reads it, seconds have passed."""
    started = record.run_started_at if record.run_started_at is not None else recorded_at
    started = min(started, now)  # an API clock ahead of ours must not delay the first poll
    return PendingRun(
        segment_id=segment_id,
        run_id=record.run_id,
        sort=record.sort,
        started_at=started,
        storage_id=storage_id,
        attempt=record.attempt,
        kickoff=record.kickoff,
        segment_name=record.segment_name,
        next_poll_at=started,
        alone=bool(record.alone),
    )


def poll_delay(age: float) -> float:
    """Soon after the start, then less often: wait as long as the run has run (5 s to 10 minutes).

    Keyed to the run's age, not to the poll count, so that a run first polled late (many runs
    ahead of it) is not polled again seconds later.
    """
    return float(min(max(age, FIRST_POLL_DELAY), MAX_POLL_DELAY))


class Step(enum.Enum):
    MATERIALIZE = "materialize"
    WAIT = "wait"
    RESTART = "restart"  # failed, attempts left: start a fresh run
    GIVE_UP = "give_up"  # failed, no attempts left
    EXPIRED = "expired"


@dataclass(frozen=True)
class Decision:
    step: Step
    run: PendingRun


def decide(run: PendingRun, status: RunStatus, now: float, *, max_attempts: int) -> Decision:
    """The next step of a polled run; `max_attempts` is MATCHALL_MAX_RUN_ATTEMPTS (settings)."""
    if status.state is RunState.READY:
        return Decision(Step.MATERIALIZE, replace(run, polls=run.polls + 1))
    if status.state is RunState.EXPIRED:
        return Decision(Step.EXPIRED, run)
    if status.state is RunState.FAILED:
        return Decision(Step.RESTART if run.attempt < max_attempts else Step.GIVE_UP, run)
    return Decision(Step.WAIT, backed_off(run, now))


def backed_off(run: PendingRun, now: float) -> PendingRun:
    return replace(run, polls=run.polls + 1, next_poll_at=now + poll_delay(now - run.started_at))


@dataclass(frozen=True)
class Due:
    """A run that may be polled: `fresh` ones come from new records, the others from the cursor."""

    due_at: float
    storage_id: int
    fresh: bool


def plan(waiting: Iterable[Due], fresh: Sequence[Due], now: float, budget: int) -> list[Due]:
    """The runs to poll this tick: due ones, oldest due first (ties by record), at most `budget`.

    New records are taken in event-log order (their due times made non-decreasing), so that the
    ones taken are always a prefix and the cursor needs only the last record taken.
    """
    ordered: list[Due] = []
    latest = -math.inf
    for item in fresh:
        latest = max(latest, item.due_at)
        if latest > now:
            break
        ordered.append(replace(item, due_at=latest))
    due = (item for item in waiting if item.due_at <= now)
    return heapq.nsmallest(budget, [*ordered, *due], key=lambda item: (item.due_at, item.storage_id))

"""The readiness sensor: polls the pending match-all runs and launches the reads of the ready ones.

A tick loads what it works on (`pending_runs.load`: new records, due waiting runs, replaced ones),
polls each chosen run with `Poller.poll` (one run in, one `Outcome` out: its step, the run
requests and events it produces, the requests it spent), and merges the outcomes into the cursor
and the result. The policy (`decide`, `plan`, the figures) is `lifecycle.policy`, the cursor
`lifecycle.cursor`.

Guarantees: at most `REQUESTS_PER_TICK` requests a tick, none started after the poll window, the
tick over within `TICK_DEADLINE_SECONDS`; due runs polled oldest-due first; a newer run of a
segment replaces the older one without a request; a killed tick saves no cursor, and nothing in
the cursor is changed before the result is returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import dagster as dg

from matchall_dagster.api.budget import Priority
from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.api.errors import (
    ActiveCampaignError,
    APIUnavailableError,
    AuthenticationError,
    BudgetStoreError,
)
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.lifecycle.policy import (
    POLL_WINDOW_SECONDS,
    REQUESTS_PER_TICK,
    SENSOR_REQUEST_TIMEOUT,
    TICK_DEADLINE_SECONDS,
    UNAVAILABLE_STOPS_TICK,
    Decision,
    Due,
    PendingRun,
    Step,
    backed_off,
    decide,
)
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.metadata import labelled
from matchall_dagster.orchestration.names import RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.orchestration.pending_runs import Batch, is_active, load, pending_observation
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.orchestration.small_reads import batch_requests, is_small
from matchall_dagster.settings import settings

__all__ = ["POLL_WINDOW_SECONDS", "REQUESTS_PER_TICK", "TICK_DEADLINE_SECONDS", "build_readiness"]

SENSOR_MAX_RETRIES = 0
NEW_RECORDS_SECONDS = 4.0  # at most this long reading new records a tick (a long history takes several)

# The wall clock of the polling schedule. A benchmark replaces it to run hours of ticks in minutes.
clock: Callable[[], float] = time.time


class _OutOfTimeError(Exception):
    """A wait inside the client would end after the tick's poll window."""


@dataclass
class _TickSleep:
    """The sensor client's `sleep`: waits (for a 429's Retry-After) only while the window lasts."""

    window_ends: float  # time.monotonic()

    def __call__(self, seconds: float) -> None:
        if time.monotonic() + seconds > self.window_ends:
            raise _OutOfTimeError
        time.sleep(seconds)


def _polling_client(activecampaign: ActiveCampaignResource, window_ends: float) -> ActiveCampaignClient:
    """The readiness sensor's client: due first in the account's budget, no retries, waits bounded by the tick."""
    return activecampaign.build_client(
        priority=Priority.DUE,
        request_timeout=SENSOR_REQUEST_TIMEOUT,
        max_retries=SENSOR_MAX_RETRIES,
        max_concurrent_requests=1,
        sleep=_TickSleep(window_ends),
    )


def materialize_request(account: Account, run: PendingRun) -> dg.RunRequest:
    return dg.RunRequest(
        job_name=account.name("segment_matches_job"),
        run_key=f"{run.segment_id}/{run.run_id}",  # one materialization per remote run
        partition_key=run.segment_id,
        run_config={
            "ops": {account.matches_key.to_python_identifier(): {"config": {"run_id": run.run_id, "sort": run.sort}}}
        },
        tags={"matchall/run_id": run.run_id, "matchall/sort": run.sort, "matchall/polls": str(run.polls)},
    )


def check_request(account: Account, run: PendingRun, check_name: str) -> dg.RunRequest:
    """A run of one check alone, judging this remote run, so that its verdict lands on the partition."""
    return dg.RunRequest(
        job_name=account.name("segment_matches_job"),
        run_key=f"{run.segment_id}/{run.run_id}/{check_name}",
        partition_key=run.segment_id,
        asset_selection=[],
        asset_check_keys=[dg.AssetCheckKey(account.matches_key, check_name)],
        run_config={"ops": {account.check_op(check_name): {"config": {"run_id": run.run_id, "sort": run.sort}}}},
        tags={"matchall/run_id": run.run_id, "matchall/sort": run.sort},
    )


@dataclass(frozen=True)
class Outcome:
    """What handling one chosen run did. `taken`: its record is done with this tick (passed over, or
    polled and decided), so it leaves the cursor unless `waiting` holds its next poll."""

    item: Due
    skipped: str = ""  # "gone", "superseded" or "dropped": taken without a request
    polled: bool = False  # a poll was answered or failed (not when the tick stopped before it)
    step: Step | None = None
    taken: bool = False
    waiting: tuple[float, int] | None = None
    requests: tuple[dg.RunRequest, ...] = ()
    events: tuple[dg.AssetObservation, ...] = ()
    small: PendingRun | None = None  # a ready run of a small segment, for a batch (small_reads)
    spent: int = 0  # requests sent
    unavailable: bool = False  # the poll found the API unavailable (429, 5xx, network)
    stop: str = ""  # why the tick ends here


def _later(run: PendingRun) -> tuple[float, int]:
    """The cursor's entry of a run polled without a decision: due again after the usual wait."""
    later = backed_off(run, clock())
    return later.next_poll_at, later.polls


@dataclass
class Poller:
    """Polls one chosen run at a time and says what follows; the tick's state is the client's count."""

    instance: dg.DagsterInstance
    account: Account
    client: ActiveCampaignClient
    log: logging.Logger
    batch: Batch
    budget: int
    window_ends: float  # time.monotonic()
    max_attempts: int
    batch_size: int  # small ready segments a batch (0: none batched)
    _active: dict[str, bool] = field(default_factory=dict)

    def poll(self, item: Due) -> Outcome:
        run = self.batch.runs.get(item.storage_id)
        skipped = self._skipped(run)
        if skipped or run is None:
            return Outcome(item, skipped=skipped or "gone", taken=True)
        if self.client.requests_sent >= self.budget:
            return Outcome(item, stop="request budget spent")
        if time.monotonic() >= self.window_ends:
            return Outcome(item, stop="time budget spent")
        before = self.client.requests_sent
        try:
            status = self.client.poll_run(run.segment_id, run.run_id, sort=run.sort)
        except _OutOfTimeError:
            return Outcome(
                item, spent=self.client.requests_sent - before, stop="the API asked to wait past the tick's window"
            )
        except AuthenticationError as exc:
            self.log.error(f"Stopped polling: {exc}")
            return Outcome(item, spent=self.client.requests_sent - before, stop="the API refused the token")
        except BudgetStoreError as exc:
            self.log.error(f"Stopped polling: {exc}")
            return Outcome(item, spent=self.client.requests_sent - before, stop="the request budget's store failed")
        except ActiveCampaignError as exc:
            # One bad segment never stops the others: note it, poll it later (backing off).
            self.log.warning(f"Polling run {run.run_id} of segment {run.segment_id} failed: {exc}")
            unavailable = isinstance(exc, APIUnavailableError)
            spent = self.client.requests_sent - before
            return Outcome(item, polled=True, taken=True, waiting=_later(run), spent=spent, unavailable=unavailable)
        decision = decide(run, status, clock(), max_attempts=self.max_attempts)
        if decision.step is Step.RESTART and self.client.requests_sent >= self.budget:
            # Polled again next tick, first: it became due before the others.
            spent = self.client.requests_sent - before
            return Outcome(
                item, polled=True, step=decision.step, spent=spent, stop="no request left to start a fresh run"
            )
        small = self.batch_size > 0 and is_small(status) and not run.alone
        return self._act(item, decision, before, small=small)

    def _skipped(self, run: PendingRun | None) -> str:
        """Why a chosen run is passed over without a request, or "" to poll it."""
        if run is None:
            return "gone"  # its record is gone (wiped event log): forget it
        if self.batch.newer.get(run.segment_id, run.storage_id) > run.storage_id:
            return "superseded"
        if run.segment_id not in self._active:
            self._active[run.segment_id] = is_active(self.instance, self.account, run.segment_id)
        # Polling a deleted or forgotten segment costs requests for nothing, and a request for a
        # forgotten partition would fail the tick; the next kick-off after it is listed again starts it.
        return "" if self._active[run.segment_id] else "dropped"

    def _act(self, item: Due, decision: Decision, before: int, *, small: bool) -> Outcome:
        run, step = decision.run, decision.step
        segment = labelled(run.segment_id, run.segment_name)
        if step is Step.MATERIALIZE and small:
            spent = self.client.requests_sent - before
            return Outcome(item, polled=True, step=step, taken=True, small=run, spent=spent)
        requests: tuple[dg.RunRequest, ...] = ()
        events: tuple[dg.AssetObservation, ...] = ()
        waiting = (run.next_poll_at, run.polls) if step is Step.WAIT else None
        if step is Step.MATERIALIZE:
            self.log.info(
                f"Run {run.run_id} of {segment} is ready; launching the materialization of partition {run.segment_id}."
            )
            requests = (materialize_request(self.account, run),)
        elif step is Step.EXPIRED:
            self.log.warning(
                f"Run {run.run_id} of {segment} expired (404) before it could be read; recording it on the check "
                f"run_not_expired. The next kick-off starts a new run; to read the segment sooner, materialize "
                f"partition {run.segment_id} by hand."
            )
            requests = (check_request(self.account, run, RUN_NOT_EXPIRED),)
        elif step in (Step.RESTART, Step.GIVE_UP):
            requests = (check_request(self.account, run, RUN_NOT_FAILED),)
            fresh = self._restart(run) if step is Step.RESTART else None
            events = () if fresh is None else (fresh,)
            if step is Step.RESTART and fresh is None:  # the start failed: poll the failed run again later
                waiting = _later(run)
            self._log_failure(run, segment, step, restarted=fresh is not None)
        spent = self.client.requests_sent - before
        return Outcome(
            item, polled=True, step=step, taken=True, waiting=waiting, requests=requests, events=events, spent=spent
        )

    def _restart(self, run: PendingRun) -> dg.AssetObservation | None:
        """Start a fresh run of a failed one's segment; its record brings it back to the sensor."""
        try:
            fresh = self.client.start_run(run.segment_id, sort=run.sort)
        except ActiveCampaignError as exc:
            self.log.warning(f"Could not start a fresh run of segment {run.segment_id}: {exc}")
            return None
        return pending_observation(
            self.account,
            run.segment_id,
            fresh,
            run.sort,
            attempt=run.attempt + 1,
            kickoff=run.kickoff,
            name=run.segment_name,
        )

    def _log_failure(self, run: PendingRun, segment: str, step: Step, *, restarted: bool) -> None:
        then = (
            "started a fresh run."
            if restarted
            else "will try to start a fresh run later."
            if step is Step.RESTART
            else "giving up until the next kick-off."
        )
        self.log.warning(
            f"Run {run.run_id} of {segment} failed (attempt {run.attempt}); {then} Runs that keep failing point "
            f"to the segment's definition: open it in ActiveCampaign."
        )


def poll_each(poller: Poller) -> list[Outcome]:
    """The outcomes of the chosen runs, in order, up to the first that ends the tick."""
    outcomes: list[Outcome] = []
    unavailable = 0
    for item in poller.batch.chosen:
        outcome = poller.poll(item)
        if outcome.polled:
            unavailable = unavailable + 1 if outcome.unavailable else 0
        if not outcome.stop and unavailable >= UNAVAILABLE_STOPS_TICK:
            outcome = replace(outcome, stop=f"{unavailable} polls in a row found the API unavailable")
        outcomes.append(outcome)
        if outcome.stop:
            break
    return outcomes


@dataclass
class TickReport:
    """What one evaluation did, for its skip message and log."""

    waiting: int = 0
    new_taken: int = 0
    polled: int = 0
    requests: int = 0
    superseded: int = 0
    dropped: int = 0
    stopped: str = ""

    def count(self, outcome: Outcome) -> None:
        self.superseded += outcome.skipped == "superseded"
        self.dropped += outcome.skipped == "dropped"
        self.polled += outcome.polled
        self.new_taken += outcome.polled and outcome.step is not None and outcome.item.fresh
        self.requests += outcome.spent
        self.stopped = self.stopped or outcome.stop

    def describe(self) -> str:
        if not self.waiting and not self.polled:
            return "No runs pending; waiting for the next kick-off (or a new segment)."
        text = (
            f"{self.waiting} run(s) waiting after this tick; polled {self.polled} "
            f"({self.new_taken} new), {self.requests} request(s)"
        )
        if self.superseded:
            text += f", {self.superseded} superseded by a newer run"
        if self.dropped:
            text += f", {self.dropped} dropped (segment marked deleted or forgotten)"
        return text + (f"; stopped early: {self.stopped}" if self.stopped else "") + "."


def merge(cursor: ReadinessCursor, batch: Batch, outcomes: list[Outcome]) -> tuple[ReadinessCursor, TickReport]:
    """The next cursor (a new one: the loaded cursor is left as it was) and the tick's report."""
    report = TickReport(superseded=batch.superseded)
    waiting = dict(cursor.waiting)
    after = cursor.after
    for outcome in outcomes:
        report.count(outcome)
        if not outcome.taken:
            continue
        storage_id = outcome.item.storage_id
        if outcome.item.fresh:
            after = max(after or 0, storage_id)
        waiting.pop(storage_id, None)
        if outcome.waiting is not None:
            waiting[storage_id] = outcome.waiting
    if not batch.fresh or after == batch.fresh[-1].storage_id:
        after = batch.scanned_to  # every run read was taken: pass over the other records read too
    report.waiting = len(waiting)
    return ReadinessCursor(after, waiting), report


def build_readiness(
    account: Account, matches: dg.AssetsDefinition, small_reads_job: dg.JobDefinition
) -> tuple[dg.UnresolvedAssetJobDefinition, dg.SensorDefinition]:
    """The account's readiness sensor and the job of one partition of `segment_matches` it launches."""
    # One partition of segment_matches with its checks: a large segment's read, or a check alone.
    matches_job = dg.define_asset_job(
        account.name("segment_matches_job"),
        selection=dg.AssetSelection.assets(matches),
        tags=dict(account.tags) or None,
    )

    @dg.sensor(
        name=account.name("match_all_readiness_sensor"),
        jobs=[matches_job, small_reads_job],
        minimum_interval_seconds=account.readiness_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={account.api_resource},
        description="Polls each pending match-all run (backing off per run, oldest due first, a fixed request "
        "budget per tick) and materializes its partition once ready: a large segment in a run of its own, the "
        "small ones (one page) in batches.",
    )
    def match_all_readiness_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return tick(context, account)

    return matches_job, match_all_readiness_sensor


def tick(context: dg.SensorEvaluationContext, account: Account) -> dg.SensorResult:
    """One evaluation of the readiness sensor."""
    attempts = settings().max_run_attempts
    batch_size = settings().small_batch_segments
    started = time.monotonic()
    window_ends = started + POLL_WINDOW_SECONDS
    budget = REQUESTS_PER_TICK
    cursor = ReadinessCursor.load(context.cursor, context.log)
    batch = load(context.instance, account, cursor, clock(), budget, context.log, until=started + NEW_RECORDS_SECONDS)
    client = _polling_client(account.api(context), window_ends)
    try:
        outcomes = poll_each(
            Poller(context.instance, account, client, context.log, batch, budget, window_ends, attempts, batch_size)
        )
    finally:
        client.close()
    cursor, report = merge(cursor, batch, outcomes)
    if report.stopped:
        context.log.info(f"Tick {report.describe()}")
    small = [outcome.small for outcome in outcomes if outcome.small is not None]
    if small:
        context.log.info(f"{len(small)} small segment(s) ready; reading them in batches of up to {batch_size}.")
    requests = [request for outcome in outcomes for request in outcome.requests]
    requests += batch_requests(account, small, batch_size)
    events = [event for outcome in outcomes for event in outcome.events]
    return dg.SensorResult(
        run_requests=requests,
        asset_events=events,
        cursor=cursor.dump(),
        skip_reason=None if requests or events else report.describe(),
    )

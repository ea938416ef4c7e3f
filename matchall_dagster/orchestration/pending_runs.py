"""Pending-run records in the event log: written as observations, read back by the readiness sensor.

Each started run is an `AssetObservation` of its `segment_matches` partition holding a
`PendingRecord` (see `lifecycle.record`), so the UI shows per partition which run is pending since
when. `load` gathers what one readiness tick works on, in a few bounded queries: the new records
(after the cursor), the waiting runs due (by record id), and which of them a newer run replaces.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import dagster as dg
from pydantic import ValidationError

from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.lifecycle.policy import Due, PendingRun, pending_run, plan
from matchall_dagster.lifecycle.record import PENDING, PendingRecord, status_of
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.dagster_private import latest_observation_ids
from matchall_dagster.orchestration.deletions import is_deleted
from matchall_dagster.orchestration.metadata import labelled

OBSERVATION_PAGE = 2_000  # records read at most per query

_log = logging.getLogger(__name__)


def pending_observation(
    account: Account,
    segment_id: str,
    run: MatchAllRun,
    sort: str,
    attempt: int = 1,
    kickoff: str | None = None,
    name: str | None = None,
) -> dg.AssetObservation:
    record = PendingRecord.of(run, sort, attempt=attempt, kickoff=kickoff, name=name)
    return dg.AssetObservation(
        asset_key=account.matches_key,
        partition=segment_id,
        description=f"Match-all run {run.run_id} of {labelled(segment_id, name)} pending since "
        f"{run.run_id_start:%Y-%m-%d %H:%M:%S} UTC.",
        metadata=record.to_metadata(),
    )


def pending_record(record: dg.EventLogRecord, log: logging.Logger = _log) -> PendingRecord | None:
    """The pending-run record an observation holds, or None for another kind of observation."""
    observation = record.asset_observation
    if observation is None or record.partition_key is None or status_of(observation.metadata) != PENDING:
        return None
    try:
        return PendingRecord.extract(observation.metadata)
    except ValidationError:
        log.warning(f"Ignored a malformed pending-run record of segment {record.partition_key}.")
        return None


def _pending_run(record: dg.EventLogRecord, now: float, log: logging.Logger) -> PendingRun | None:
    pending = pending_record(record, log)
    if pending is None or record.partition_key is None:
        return None
    return pending_run(record.partition_key, pending, record.storage_id, record.timestamp, now)


def new_pending(
    instance: dg.DagsterInstance,
    account: Account,
    after: int | None,
    budget: int,
    now: float,
    log: logging.Logger,
    *,
    until: float,
) -> tuple[list[PendingRun], int | None, int]:
    """The first `budget` pending runs recorded after `after` that no newer record of their segment
    replaces; the id of the last record read; how many were passed over as replaced.

    Pages grow from twice the budget, so that a tick reads little when the sensor keeps up and
    gets through a long history (a cursor reset) quickly; reading stops at `until` (monotonic).
    """
    runs: list[PendingRun] = []
    last = after
    replaced = 0
    size = 2 * budget
    while True:
        page = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=account.matches_key, after_storage_id=last), limit=size, ascending=True
        )
        parsed = [(record, _pending_run(record, now, log)) for record in page.records]
        oldest: dict[str, int] = {}
        for record, run in parsed:
            if run is not None:
                oldest.setdefault(run.segment_id, record.storage_id)
        newer = newer_pending(instance, account, oldest, now)
        for record, run in parsed:
            last = record.storage_id
            if run is None:
                continue
            if newer.get(run.segment_id, run.storage_id) > run.storage_id:
                replaced += 1
                continue
            runs.append(run)
            if len(runs) == budget:
                return runs, last, replaced
        if not page.has_more or time.monotonic() >= until:
            return runs, last, replaced
        size = min(2 * size, OBSERVATION_PAGE)


def newer_pending(
    instance: dg.DagsterInstance, account: Account, candidates: dict[str, int], now: float
) -> dict[str, int]:
    """Of these segments (with the record id of the run about to be polled), those with a newer
    pending-run record, and its id. One indexed query for the tick's few segments."""
    latest = latest_observation_ids(instance, account.matches_key, candidates)
    later = [storage_id for segment_id, storage_id in latest.items() if storage_id > candidates[segment_id]]
    if not later:
        return {}
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=account.matches_key, storage_ids=later), limit=len(later)
    ).records
    return {
        record.partition_key: record.storage_id
        for record in records
        if record.partition_key is not None and _pending_run(record, now, _log) is not None
    }


def waiting_runs(
    instance: dg.DagsterInstance,
    account: Account,
    cursor: ReadinessCursor,
    storage_ids: list[int],
    now: float,
    log: logging.Logger,
) -> dict[int, PendingRun]:
    """The waiting runs chosen, read back by record id (the cursor does not repeat the records)."""
    if not storage_ids:
        return {}
    runs: dict[int, PendingRun] = {}
    for record in instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=account.matches_key, storage_ids=storage_ids), limit=len(storage_ids)
    ).records:
        run = _pending_run(record, now, log)
        if run is not None:
            due_at, polls = cursor.waiting[record.storage_id]
            runs[record.storage_id] = replace(run, polls=polls, next_poll_at=due_at)
    return runs


def is_active(instance: dg.DagsterInstance, account: Account, segment_id: str) -> bool:
    """Still a partition, and not marked deleted: two indexed lookups."""
    return instance.has_dynamic_partition(account.partitions_name, segment_id) and not is_deleted(
        instance, account, segment_id
    )


@dataclass(frozen=True)
class Batch:
    """What one readiness tick works on."""

    chosen: list[Due]  # to poll, in order
    runs: dict[int, PendingRun]  # the chosen runs by record id (a record gone is missing)
    newer: dict[str, int]  # segments of chosen waiting runs that a newer pending run replaces
    fresh: list[PendingRun]  # the new records taken into account this tick, in log order
    scanned_to: int | None  # the last record read
    superseded: int  # new records passed over as replaced


def load(
    instance: dg.DagsterInstance,
    account: Account,
    cursor: ReadinessCursor,
    now: float,
    budget: int,
    log: logging.Logger,
    *,
    until: float,
) -> Batch:
    fresh, scanned_to, superseded = new_pending(instance, account, cursor.after, budget, now, log, until=until)
    chosen = plan(
        (Due(due_at, storage_id, False) for storage_id, (due_at, _) in cursor.waiting.items()),
        [Due(run.next_poll_at, run.storage_id, True) for run in fresh],
        now,
        budget,
    )
    runs = {run.storage_id: run for run in fresh}
    runs.update(
        waiting_runs(instance, account, cursor, [item.storage_id for item in chosen if not item.fresh], now, log)
    )
    # A segment with a newer pending run drops the older one: never materialize stale members last.
    # (New records were sifted as they were read.)
    candidates: dict[str, int] = {}
    for item in chosen:
        if not item.fresh and item.storage_id in runs:
            segment_id = runs[item.storage_id].segment_id
            candidates[segment_id] = min(item.storage_id, candidates.get(segment_id, item.storage_id))
    newer = newer_pending(instance, account, candidates, now)
    return Batch(chosen, runs, newer, fresh, scanned_to, superseded)

"""The discovery sensor: lists the account's segments and turns changes into partitions and runs.

One listing a tick (one request per 10,000 segments, due first in the account's request budget); the
decisions (new, missing, deleted, listed again; when the catalog is refreshed) are
`lifecycle.discovery`'s. The sensor wires the instance, the cursor and the results.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from matchall_dagster.api.budget import Priority
from matchall_dagster.api.errors import ActiveCampaignError
from matchall_dagster.api.models import Segment
from matchall_dagster.lifecycle.discovery import DiscoveryCursor, Reconciliation, catalog_due, fingerprints, reconcile
from matchall_dagster.lifecycle.policy import SENSOR_REQUEST_TIMEOUT
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.catalog import LIST_PAGE_SIZE, names_of, read_catalog
from matchall_dagster.orchestration.deletions import (
    MISSING_TWICE,
    deleted_ids,
    deleted_observation,
    listed_again_observation,
)
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.storage.store import MembershipStore

__all__ = ["build_discovery_sensor"]

# The wall clock of the catalog's refresh rule; tests move it forward instead of waiting.
clock: Callable[[], float] = time.time


def _listing(activecampaign: ActiveCampaignResource) -> list[Segment]:
    with activecampaign.get_client(
        priority=Priority.DUE, max_retries=1, request_timeout=SENSOR_REQUEST_TIMEOUT
    ) as client:
        return client.list_segments(page_size=LIST_PAGE_SIZE)  # 10,000 segments a request


@dataclass
class _Actions:
    """What a listing's changes turn into: run and partition requests, events, a summary's parts."""

    requests: list[dg.RunRequest] = field(default_factory=list)
    partitions: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = field(default_factory=list)
    events: list[dg.AssetObservation] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


def _actions(
    account: Account,
    change: Reconciliation,
    names: dict[str, str],
    store: MembershipStore,
    now: float,
    log: logging.Logger,
) -> _Actions:
    actions = _Actions()
    if change.new:
        log.info(
            f"Discovered {len(change.new)} new segment(s): {', '.join(change.new[:20])}"
            f"{' ...' if len(change.new) > 20 else ''}"
        )
        digest = hashlib.sha256(",".join(change.new).encode()).hexdigest()[:16]
        actions.partitions.append(account.segments_partitions.build_add_request(change.new))
        actions.requests.append(
            dg.RunRequest(
                job_name=account.name("match_all_kickoff_job"),
                run_key=f"discovered/{digest}/{now:.0f}",  # a segment forgotten, then listed again, is started again
                run_config={"ops": {account.name("start_match_all_runs"): {"config": {"segment_ids": change.new}}}},
            )
        )
        actions.done.append(f"added {len(change.new)}")
    if change.to_mark:
        known_names = names_of(read_catalog(store, change.to_mark, patience=0.5))
        log.warning(
            f"{len(change.to_mark)} tracked segment(s) missing from two listings in a row, marked deleted (their "
            f"rows are kept): {', '.join(change.to_mark[:20])}{' ...' if len(change.to_mark) > 20 else ''}"
        )
        actions.partitions.append(dg.AddDynamicPartitionsRequest(account.deleted_name, change.to_mark))
        actions.events.extend(
            deleted_observation(account, s, MISSING_TWICE, known_names.get(s)) for s in change.to_mark
        )
        actions.done.append(f"marked {len(change.to_mark)} deleted")
    if change.listed_again:
        log.info(f"{len(change.listed_again)} segment(s) marked deleted are listed again: unmarked.")
        actions.partitions.append(dg.DeleteDynamicPartitionsRequest(account.deleted_name, change.listed_again))
        actions.events.extend(listed_again_observation(account, s, names.get(s)) for s in change.listed_again)
        actions.done.append(f"unmarked {len(change.listed_again)}")
    if change.missing_once:
        actions.done.append(f"{len(change.missing_once)} missing once")
    return actions


def build_discovery_sensor(
    account: Account, kickoff_job: dg.JobDefinition, catalog_job: dg.UnresolvedAssetJobDefinition
) -> dg.SensorDefinition:
    """The account's discovery sensor; it launches the kick-off of new segments and the catalog's refresh."""

    @dg.sensor(
        name=account.name("segment_discovery_sensor"),
        jobs=[kickoff_job, catalog_job],
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={account.api_resource, account.store_resource},
        description=f"Lists the saved segments of {account.label} (GET /api/3/audiences, one request per 10,000): "
        f"adds the new ones the selection admits ({account.segments.describe()}) as partitions and starts their "
        "runs, marks tracked ones missing from two listings in a row as deleted (unmarked when listed again), and "
        "refreshes the catalog when the listing changed (sizes alone: at most hourly).",
    )
    def segment_discovery_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return discover(context, account, catalog_job.name)

    return segment_discovery_sensor


def discover(context: dg.SensorEvaluationContext, account: Account, catalog_job: str) -> dg.SensorResult:
    """One tick of the discovery sensor."""
    now = clock()
    try:
        listed = _listing(account.api(context))
    except ActiveCampaignError as exc:  # not a listing: nothing counts as missing
        return dg.SensorResult(skip_reason=f"Could not list the account's segments: {exc}", cursor=context.cursor)
    cursor = DiscoveryCursor.load(context.cursor, context.log)
    instance = context.instance
    partitions = set(instance.get_dynamic_partitions(account.partitions_name))
    deleted = deleted_ids(instance, account)
    listed_ids = [segment.id for segment in listed]
    names = {segment.id: segment.name for segment in listed}
    admitted = set(account.segments.tracked([*listed_ids, *partitions], names, unknown_name=True))
    change = reconcile(listed_ids, admitted, partitions, deleted, cursor.missing)

    actions = _actions(account, change, names, account.membership_store(context), now, context.log)
    requests, partition_requests, events, done = actions.requests, actions.partitions, actions.events, actions.done

    after_deleted = (deleted | set(change.to_mark)) - set(change.listed_again)
    structure, counts = fingerprints(listed, partitions | set(change.new), after_deleted)
    why = catalog_due(cursor, structure, counts, now)
    if why is not None:
        requests.append(dg.RunRequest(job_name=catalog_job, run_key=f"catalog/{now:.0f}", tags={"matchall/why": why}))
        cursor = DiscoveryCursor(cursor.missing, structure, counts, now)
        done.append(f"catalog refresh requested ({why})")
    cursor.missing = change.missing_once
    summary = f"{len(listed)} segment(s) listed: " + ("; ".join(done) or "no changes") + "."
    if done:
        context.log.info(summary)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=partition_requests,
        asset_events=events,
        cursor=cursor.dump(),
        skip_reason=None if requests else summary,
    )

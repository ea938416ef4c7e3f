"""Segments deleted in ActiveCampaign: the set of tracked segments marked deleted, and its events.

A tracked segment is marked deleted when two full listings in a row miss it (the discovery
sensor) or when its kick-off answers 404 (the kick-off). A marked segment is not kicked off or
polled any more; its partition and its stored rows stay. Listed again, it is unmarked. Removing
its partition is one explicit action: `matchall forget SEGMENT_ID` (`forget` below).

The set lives in the instance as a second dynamic partitions definition used as a set, not
attached to any asset: durable, written with public APIs (a sensor's `dynamic_partitions_requests`,
`instance.add_dynamic_partitions`), and read in one indexed query (`deleted_ids`), which stays cheap
at 10,000 segments. The analyst sees each mark as an observation on the segment's partition of
`segment_matches` (what happened, what to do) and as `status = deleted` in the catalog table.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from matchall_dagster.lifecycle.record import DELETED, LISTED_AGAIN, DeletionRecord
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.metadata import labelled

__all__ = [
    "DELETED",
    "KICKOFF_404",
    "LISTED_AGAIN",
    "MISSING_TWICE",
    "Forgotten",
    "NotForgettableError",
    "deleted_ids",
    "deleted_observation",
    "forget",
    "is_deleted",
    "listed_again_observation",
    "mark_deleted",
]

MISSING_TWICE = "missing from two listings in a row"
KICKOFF_404 = "the kick-off answered 404 (no such segment)"


def deleted_ids(instance: dg.DagsterInstance, account: Account) -> set[str]:
    return set(instance.get_dynamic_partitions(account.deleted_name))


def is_deleted(instance: dg.DagsterInstance, account: Account, segment_id: str) -> bool:
    return instance.has_dynamic_partition(account.deleted_name, segment_id)


def mark_deleted(instance: dg.DagsterInstance, account: Account, segment_ids: list[str]) -> None:
    instance.add_dynamic_partitions(account.deleted_name, segment_ids)


def deleted_observation(account: Account, segment_id: str, reason: str, name: str | None = None) -> dg.AssetObservation:
    metadata = DeletionRecord(status=DELETED, reason=reason, segment_name=name or None).to_metadata()
    return dg.AssetObservation(
        asset_key=account.matches_key,
        partition=segment_id,
        description=f"ActiveCampaign no longer has {labelled(segment_id, name)} ({reason}): marked deleted, no "
        f"longer kicked off. Its stored rows are kept. It comes back by itself if ActiveCampaign lists it again; "
        f"to drop the partition, run `matchall forget {segment_id}`.",
        metadata=metadata,
    )


def listed_again_observation(account: Account, segment_id: str, name: str | None = None) -> dg.AssetObservation:
    metadata = DeletionRecord(status=LISTED_AGAIN, segment_name=name or None).to_metadata()
    return dg.AssetObservation(
        asset_key=account.matches_key,
        partition=segment_id,
        description=f"ActiveCampaign lists {labelled(segment_id, name)} again: no longer marked deleted; the next "
        f"kick-off starts a run of it.",
        metadata=metadata,
    )


@dataclass(frozen=True)
class Forgotten:
    segment_id: str
    was_deleted: bool


class NotForgettableError(Exception):
    """The segment is not a partition, or is not marked deleted and `force` was not given."""


def forget(instance: dg.DagsterInstance, account: Account, segment_id: str, *, force: bool = False) -> Forgotten:
    """Delete the segment's partition of `segment_matches` and its mark; stored rows are kept."""
    if not instance.has_dynamic_partition(account.partitions_name, segment_id):
        raise NotForgettableError(
            f"Segment {segment_id!r} is not a partition of segment_matches; `matchall segments` lists the tracked ones."
        )
    marked = is_deleted(instance, account, segment_id)
    if not marked and not force:
        raise NotForgettableError(
            f"Segment {segment_id!r} is not marked deleted: while ActiveCampaign lists it, discovery adds it again. "
            f"To stop tracking it, leave it out of MATCHALL_SEGMENTS; to drop the partition anyway, add --force."
        )
    instance.delete_dynamic_partition(account.partitions_name, segment_id)
    if marked:
        instance.delete_dynamic_partition(account.deleted_name, segment_id)
    return Forgotten(segment_id, marked)

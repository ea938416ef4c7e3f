"""The calls into Dagster's non-public API that the orchestration layer makes, kept apart.

The readiness sensor must know, for a few hundred segments at a time, the id of the latest
observation of each partition: one grouped, indexed query in the event log storage. Dagster 1.13
has no public equivalent at that cost: `DagsterInstance.fetch_observations` with
`AssetRecordsFilter(asset_partitions=...)` returns every observation of those partitions (a
history after a lost cursor: tens of thousands), one query per partition with `limit=1` costs a
query a segment, and `get_asset_records`/`get_status_by_partition` know materializations only.
(`DagsterInstance.get_latest_storage_id_by_partition` forwards to the same storage method, from
a mixin Dagster documents as non-public.)

A batch of small segments (`small_reads`) logs the checks' verdicts on each partition it
materializes; the UI counts a verdict only while it names the partition's latest materialization
as its target, and the record that names it (`AssetCheckEvaluationTargetMaterializationData`) is
not exported by Dagster 1.13 (a check run by Dagster itself gets it filled in); its import is in
`storage.dagster_private`, with the package's other private imports.

`matchall_dagster_tests/orchestration/test_dagster_private.py` pins the behaviour relied on, so
an upgrade that changes it fails there, by name, rather than in the sensor.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import dagster as dg

from matchall_dagster.storage.dagster_private import AssetCheckEvaluationTargetMaterializationData


def latest_observation_ids(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Collection[str]
) -> Mapping[str, int]:
    """The event-log id of the latest observation of each of these partitions that has one."""
    if not partitions:
        return {}
    return instance.event_log_storage.get_latest_storage_id_by_partition(
        asset_key, dg.DagsterEventType.ASSET_OBSERVATION, partitions=set(partitions)
    )


def check_target(record: dg.EventLogRecord) -> AssetCheckEvaluationTargetMaterializationData:
    """What a check evaluation logged outside the check's own step names as the materialization it judged."""
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
    )

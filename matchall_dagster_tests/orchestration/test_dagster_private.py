"""Pins the non-public Dagster call the readiness sensor relies on (`orchestration.dagster_private`),
so that a Dagster upgrade that changes it fails here, by name."""

from __future__ import annotations

import dagster as dg

from matchall_dagster.orchestration.dagster_private import check_target, latest_observation_ids

KEY = dg.AssetKey("segment_matches")


def observe(instance: dg.DagsterInstance, partition: str, key: dg.AssetKey = KEY) -> int:
    instance.report_runless_asset_event(dg.AssetObservation(asset_key=key, partition=partition))
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=key), limit=1).records
    return records[0].storage_id


def test_the_latest_observation_of_each_partition_asked_for() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("segments", ["1", "2", "3"])
        observe(instance, "1")
        latest_1 = observe(instance, "1")
        latest_2 = observe(instance, "2")
        observe(instance, "3")
        observe(instance, "1", dg.AssetKey("other"))  # another asset: not counted
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=KEY, partition="2"))  # not an observation
        found = latest_observation_ids(instance, KEY, {"1", "2", "4"})
        assert dict(found) == {"1": latest_1, "2": latest_2}  # "3" not asked for, "4" never observed
        assert latest_observation_ids(instance, KEY, set()) == {}


def test_a_check_evaluation_logged_with_its_target_counts_for_the_latest_materialization() -> None:
    """What the UI shows of a check on a partition: the latest evaluation, while it names the latest materialization."""
    key = dg.AssetCheckKey(KEY, "matches_complete")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("segments", ["1", "2"])
        for partition, targeted in (("1", False), ("2", True)):  # one run-less result per check and partition
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=KEY, partition=partition))
            (record,) = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=KEY), limit=1).records
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=KEY,
                    check_name=key.name,
                    passed=True,
                    partition=partition,
                    target_materialization_data=check_target(record) if targeted else None,
                )
            )
            (info,) = instance.event_log_storage.get_asset_check_partition_info([key], partition_keys=[partition])
            assert info.is_current is targeted
            assert info.latest_target_materialization_storage_id == (record.storage_id if targeted else None)

"""Pins what `storage.dagster_private` takes from Dagster's private modules.

The package imports `dagster._` in that module only (`test_packaging` checks), and today it takes
one record from there: `AssetCheckEvaluationTargetMaterializationData`, how a check evaluation
logged outside the check's own step names the materialization it judged. A Dagster upgrade that
renames it, changes its fields or stops taking it in `AssetCheckEvaluation` fails here, by name;
`orchestration/test_dagster_private.py` pins what the UI then does with it.
"""

from __future__ import annotations

import inspect

import dagster as dg

from matchall_dagster.storage import dagster_private
from matchall_dagster.storage.dagster_private import AssetCheckEvaluationTargetMaterializationData


def test_the_module_holds_only_what_the_package_uses() -> None:
    assert dagster_private.__all__ == ["AssetCheckEvaluationTargetMaterializationData"]


def test_the_target_record_keeps_its_fields() -> None:
    target = AssetCheckEvaluationTargetMaterializationData(storage_id=42, run_id="a-run", timestamp=1_700_000_000.5)
    assert (target.storage_id, target.run_id, target.timestamp) == (42, "a-run", 1_700_000_000.5)
    assert list(inspect.signature(AssetCheckEvaluationTargetMaterializationData).parameters) == [
        "storage_id",
        "run_id",
        "timestamp",
    ]


def test_a_check_evaluation_takes_it_as_its_target() -> None:
    target = AssetCheckEvaluationTargetMaterializationData(storage_id=7, run_id="r", timestamp=1.0)
    evaluation = dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey("segment_matches"),
        check_name="matches_complete",
        passed=True,
        partition="1",
        target_materialization_data=target,
    )
    assert evaluation.target_materialization_data == target


def test_dagster_still_does_not_export_it() -> None:
    """When it becomes public, import it from there and drop it from dagster_private."""
    assert not hasattr(dg, "AssetCheckEvaluationTargetMaterializationData")

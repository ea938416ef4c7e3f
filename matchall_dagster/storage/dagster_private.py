"""The one module of the package that imports `dagster._`: the names Dagster 1.13 uses but does not export.

Today that is a single record, `AssetCheckEvaluationTargetMaterializationData`: how a check
evaluation names the materialization it judged. A batch of small segments logs its checks'
verdicts itself (`orchestration.checks.evaluation`, through `orchestration.dagster_private`), and the
UI counts a verdict on a partition only while it names the partition's latest materialization;
a check run by Dagster itself gets the record filled in. Neither `dagster` nor its integrations
re-export it. `matchall_dagster_tests/storage/test_dagster_private.py` pins its name and fields,
and `matchall_dagster_tests/orchestration/test_dagster_private.py` the behaviour relied on, so that
a Dagster upgrade that changes them fails there, loudly.
"""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

__all__ = ["AssetCheckEvaluationTargetMaterializationData"]

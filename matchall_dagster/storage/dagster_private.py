"""Dagster's names that Dagster 1.13 does not export publicly: its database IO manager classes, and
the record by which a check evaluation names the materialization it judged.

`DbIOManager`, `DbTypeHandler`, `DbClient` and `TableSlice` are what dagster-duckdb builds its own
IO manager from (`dagster_duckdb.io_manager` imports them from the same private module), and
`storage.io_manager` subclasses them to make a partition's replacement atomic. Neither `dagster`
nor `dagster_duckdb` re-exports them, so this is the one module of the package that imports
`dagster._`: `matchall_dagster_tests/storage/test_dagster_private.py` pins the names, signatures
and call order we rely on, so that a Dagster upgrade that changes them fails there, loudly.
`AssetCheckEvaluationTargetMaterializationData` is used by `orchestration.dagster_private`
(a batch of small segments logs its checks' verdicts itself) and pinned by
`matchall_dagster_tests/orchestration/test_dagster_private.py`.
"""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.storage.db_io_manager import DbClient, DbIOManager, DbTypeHandler, TableSlice

__all__ = ["AssetCheckEvaluationTargetMaterializationData", "DbClient", "DbIOManager", "DbTypeHandler", "TableSlice"]

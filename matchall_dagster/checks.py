"""The checks on `segment_matches`, per partition.

`run_not_failed` and `run_not_expired` are about the remote run behind a partition: the asset
records them when it reads a run, and the readiness sensor records them when it finds a run
failed or gone, so a segment whose run never materializes still shows why. `matches_complete`
reads the stored rows back and compares them with what the API said the run holds.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from matchall_dagster.models import MatchAllRun
from matchall_dagster.partitions import segments_partitions

ASSET_KEY = dg.AssetKey("segment_matches")
RUN_NOT_FAILED = "run_not_failed"
RUN_NOT_EXPIRED = "run_not_expired"
MATCHES_COMPLETE = "matches_complete"
RUN_RETENTION = timedelta(days=90)
EXPIRY_WARNING = timedelta(days=10)

run_check_specs = [
    dg.AssetCheckSpec(
        RUN_NOT_FAILED,
        asset=ASSET_KEY,
        partitions_def=segments_partitions,
        description="The segment's latest match-all run did not fail (run_id_end set while not ready).",
    ),
    dg.AssetCheckSpec(
        RUN_NOT_EXPIRED,
        asset=ASSET_KEY,
        partitions_def=segments_partitions,
        description="The run can still be read: not gone (404), and not within 10 days of its 90-day limit.",
    ),
]


def run_metadata(run: MatchAllRun | None, run_id: str, sort: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"run_id": run_id, "sort": sort}
    if run is not None:
        metadata["run_started_at"] = dg.MetadataValue.timestamp(run.run_id_start)
        if run.run_id_end is not None:
            metadata["run_ended_at"] = dg.MetadataValue.timestamp(run.run_id_end)
        if run.segment_timestamp is not None:
            metadata["segment_timestamp"] = dg.MetadataValue.timestamp(run.segment_timestamp)
    return metadata


def failed_run_evaluation(segment_id: str, run: MatchAllRun, sort: str, *, retrying: bool) -> dg.AssetCheckEvaluation:
    then = "a fresh run was started" if retrying else "no more runs are started until the next kick-off"
    return dg.AssetCheckEvaluation(
        asset_key=ASSET_KEY,
        check_name=RUN_NOT_FAILED,
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        partition=segment_id,
        description=f"Run {run.run_id} ended without becoming ready; {then}.",
        metadata=run_metadata(run, run.run_id, sort),
    )


def expired_run_evaluation(segment_id: str, run_id: str, sort: str) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=ASSET_KEY,
        check_name=RUN_NOT_EXPIRED,
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        partition=segment_id,
        description=f"Run {run_id} is gone (404): expired after 90 days, or unknown. "
        f"The next kick-off starts a new one.",
        metadata=run_metadata(None, run_id, sort),
    )


def expiry_result(run: MatchAllRun, sort: str, now: datetime | None = None) -> dg.AssetCheckResult:
    """Passes, or warns when the run can be re-read for less than 10 more days."""
    expires_at = run.run_id_start + RUN_RETENTION
    left = expires_at - (now or datetime.now(UTC))
    metadata = {**run_metadata(run, run.run_id, sort), "run_expires_at": dg.MetadataValue.timestamp(expires_at)}
    if left > EXPIRY_WARNING:
        return dg.AssetCheckResult(check_name=RUN_NOT_EXPIRED, passed=True, metadata=metadata)
    return dg.AssetCheckResult(
        check_name=RUN_NOT_EXPIRED,
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"Run {run.run_id} can be re-read only until {expires_at:%Y-%m-%d %H:%M} UTC; "
        f"materialize from a newer run before then.",
        metadata=metadata,
    )


@dg.asset_check(
    asset=ASSET_KEY,
    partitions_def=segments_partitions,
    description="The stored rows are the whole list: as many as the run's page.total, positions 1..n, no id twice.",
)
def matches_complete(context: dg.AssetCheckExecutionContext, segment_matches: pd.DataFrame) -> dg.AssetCheckResult:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ASSET_KEY, asset_partitions=[context.partition_key]), limit=1
    ).records
    expected = None
    if records and records[0].asset_materialization is not None:
        total = records[0].asset_materialization.metadata.get("page_total")
        expected = int(total.value) if isinstance(total, dg.IntMetadataValue) and total.value is not None else None
    rows = len(segment_matches)
    in_order = bool(np.array_equal(np.sort(segment_matches["position"].to_numpy()), np.arange(1, rows + 1)))
    duplicates = int(segment_matches["contact_id"].duplicated().sum())
    passed = expected is not None and rows == expected and duplicates == 0 and in_order
    problems = []
    if expected is None:
        problems.append("the materialization records no page_total to compare with")
    elif rows != expected:
        problems.append(f"{rows} rows stored where the run holds {expected}")
    if duplicates:
        problems.append(f"{duplicates} contact id(s) stored more than once")
    if not in_order:
        problems.append("positions are not exactly 1..n")
    return dg.AssetCheckResult(
        passed=passed,
        description="; ".join(problems) or f"All {rows} members stored once each, positions 1..{rows}.",
        metadata={"rows": rows, "expected": expected if expected is not None else -1, "duplicates": duplicates},
    )

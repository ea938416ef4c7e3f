"""The checks on `segment_matches`, per partition.

`run_not_failed` and `run_not_expired` are about the remote run behind a partition. After a
materialization they judge the run it read (from its metadata, without a request). When the
readiness sensor finds a run failed or gone, it launches the check alone with that run's id, so
a segment whose run never materializes still shows why, in a run of its own with its log.
(Sensors could report check results without a run, but Dagster 1.13 stores only one run-less
result per check and partition.) `matches_complete` compares the stored rows with what the API
said the run holds; the database counts them (a `PartitionSummary` input, see `storage.io_manager`), so a
partition of millions of rows is never loaded into the check's process.
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from matchall_dagster.api.models import RunState
from matchall_dagster.api.validation import DEFAULT_SORT
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.dagster_private import check_target
from matchall_dagster.orchestration.metadata import PAGE_TOTAL, RUN_ID, RUN_STARTED_AT, run_metadata
from matchall_dagster.orchestration.names import MATCHES_COMPLETE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.orchestration.preview import partitioned_checks
from matchall_dagster.storage.store import PartitionSummary

__all__ = [
    "RunCheckConfig",
    "build_matches_checks",
    "completeness",
    "evaluation",
    "latest_materialization",
    "materialized_verdicts",
]
RUN_RETENTION = timedelta(days=90)
EXPIRY_WARNING = timedelta(days=10)


class RunCheckConfig(dg.Config):
    """Which remote run to judge; by default the one the partition was last materialized from."""

    run_id: str | None = Field(default=None, description="A match-all run id; empty: the materialized run.")
    sort: str = Field(default=DEFAULT_SORT, description="The sort the run was started with.")


def latest_materialization(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> dg.EventLogRecord | None:
    """The partition's latest materialization of `key`, or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records and records[0].asset_materialization is not None else None


def _materialized(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> dict[str, Any] | None:
    """The metadata of the partition's latest materialization, as plain values."""
    record = latest_materialization(context.instance, key, context.partition_key)
    if record is None or record.asset_materialization is None:
        return None
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


def _not_applicable(check_name: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=True,
        description="Nothing to judge: the partition was never materialized and no run id was given.",
    )


def _expiry(started_at: datetime, run_id: str, metadata: dict[str, Any], now: datetime) -> dg.AssetCheckResult:
    expires_at = started_at + RUN_RETENTION
    metadata = {**metadata, "run_expires_at": dg.MetadataValue.timestamp(expires_at)}
    if expires_at - now > EXPIRY_WARNING:
        return dg.AssetCheckResult(check_name=RUN_NOT_EXPIRED, passed=True, metadata=metadata)
    return dg.AssetCheckResult(
        check_name=RUN_NOT_EXPIRED,
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"Run {run_id} can be re-read only until {expires_at:%Y-%m-%d %H:%M} UTC (90 days after "
        f"its start); materialize from a newer run before then.",
        metadata=metadata,
    )


def run_not_failed(
    context: dg.AssetCheckExecutionContext, config: RunCheckConfig, account: Account
) -> dg.AssetCheckResult:
    if config.run_id is None:
        materialized = _materialized(context, account.matches_key)
        if materialized is None:
            return _not_applicable(RUN_NOT_FAILED)
        # A materialization is only ever made from a ready run.
        return dg.AssetCheckResult(passed=True, metadata={RUN_ID: materialized[RUN_ID]})
    with account.api(context).get_client() as client:
        status = client.poll_run(context.partition_key, config.run_id, sort=config.sort)
    metadata = run_metadata(status.run, config.run_id, config.sort)
    if status.state is RunState.FAILED:
        assert status.run is not None
        assert status.run.run_id_end is not None
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"Run {config.run_id} ended at {status.run.run_id_end:%Y-%m-%d %H:%M:%S} UTC without "
            f"becoming ready; it will never finish. The readiness sensor starts fresh runs (a few times); "
            f"if they keep failing, check the segment's definition in ActiveCampaign.",
            metadata=metadata,
        )
    return dg.AssetCheckResult(
        passed=True, description=f"Run {config.run_id} is {status.state.value}.", metadata=metadata
    )


def run_not_expired(
    context: dg.AssetCheckExecutionContext, config: RunCheckConfig, account: Account
) -> dg.AssetCheckResult:
    now = datetime.now(UTC)
    if config.run_id is None:
        materialized = _materialized(context, account.matches_key)
        if materialized is None:
            return _not_applicable(RUN_NOT_EXPIRED)
        started_at = datetime.fromtimestamp(float(materialized[RUN_STARTED_AT]), UTC)
        return _expiry(started_at, str(materialized[RUN_ID]), {RUN_ID: materialized[RUN_ID]}, now)
    with account.api(context).get_client() as client:
        status = client.poll_run(context.partition_key, config.run_id, sort=config.sort)
    if status.state is RunState.EXPIRED:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"Run {config.run_id} is gone (404): runs expire 90 days after their start, and unknown "
            f"ids answer the same way. The next kick-off starts a new run; to get one now, launch the "
            f"kick-off job for this segment.",
            metadata=run_metadata(None, config.run_id, config.sort),
        )
    assert status.run is not None
    return _expiry(status.run.run_id_start, config.run_id, run_metadata(status.run, config.run_id, config.sort), now)


def build_matches_checks(account: Account) -> list[dg.AssetChecksDefinition]:
    """`run_not_failed`, `run_not_expired` and `matches_complete` on the account's `segment_matches`.

    All three block: a partition that fails one is never diffed by `segment_membership_changes`
    (its automation waits for the blocking checks of its dependency to pass).
    """
    key = account.matches_key
    api = {account.api_resource}

    def check(
        name: str, description: str, *, pool: str | None = None, resources: set[str] | None = None
    ) -> Callable[[Callable[..., dg.AssetCheckResult]], dg.AssetChecksDefinition]:
        def define(function: Callable[..., dg.AssetCheckResult]) -> dg.AssetChecksDefinition:
            with partitioned_checks():  # a preview feature: see `preview`
                return dg.asset_check(
                    asset=key,
                    name=name,
                    partitions_def=account.segments_partitions,
                    pool=pool,
                    blocking=True,
                    required_resource_keys=resources,
                    description=description,
                )(function)

        return define

    @check(
        RUN_NOT_FAILED,
        "The segment's match-all run did not fail (run_id_end set while not ready).",
        pool=account.pool,
        resources=api,
    )
    def not_failed(context: dg.AssetCheckExecutionContext, config: RunCheckConfig) -> dg.AssetCheckResult:
        return run_not_failed(context, config, account)

    @check(
        RUN_NOT_EXPIRED,
        "The run can still be read: not gone (404), and not within 10 days of its 90-day limit.",
        pool=account.pool,
        resources=api,
    )
    def not_expired(context: dg.AssetCheckExecutionContext, config: RunCheckConfig) -> dg.AssetCheckResult:
        return run_not_expired(context, config, account)

    @check(
        MATCHES_COMPLETE,
        "The stored rows are the whole list: as many as the run's page.total, positions 1..n, no id twice.",
    )
    def complete(context: dg.AssetCheckExecutionContext, segment_matches: PartitionSummary) -> dg.AssetCheckResult:
        return completeness(segment_matches, (_materialized(context, key) or {}).get(PAGE_TOTAL))

    return [not_failed, not_expired, complete]


def completeness(summary: PartitionSummary, expected: int | None) -> dg.AssetCheckResult:
    """The verdict of `matches_complete` on a stored partition that the run said holds `expected` rows."""
    rows = summary.rows
    duplicates = summary.repeated_contacts
    problems = []
    if expected is None:
        problems.append("the materialization records no page_total to compare with")
    elif rows != expected:
        problems.append(f"{rows} rows stored where the run holds {expected}")
    if duplicates:
        problems.append(f"{duplicates} contact id(s) stored more than once")
    if not summary.positions_exact:
        problems.append("positions are not exactly 1..n")
    return dg.AssetCheckResult(
        check_name=MATCHES_COMPLETE,
        passed=not problems,
        description="; ".join(problems).capitalize() + ". Materialize the partition again."
        if problems
        else f"All {rows} members stored once each, positions 1..{rows}.",
        metadata={"rows": rows, "expected": expected if expected is not None else -1, "duplicates": duplicates},
    )


def materialized_verdicts(
    metadata: dict[str, Any], summary: PartitionSummary, now: datetime
) -> list[dg.AssetCheckResult]:
    """The three checks' verdicts on a partition just materialized with `metadata` (plain values):
    what the checks would say if run after it, without a run or a request of their own."""
    run_id = metadata[RUN_ID]
    started_at = datetime.fromtimestamp(float(metadata[RUN_STARTED_AT]), UTC)
    return [
        dg.AssetCheckResult(check_name=RUN_NOT_FAILED, passed=True, metadata={RUN_ID: run_id}),
        _expiry(started_at, str(run_id), {RUN_ID: run_id}, now),
        completeness(summary, metadata.get(PAGE_TOTAL)),
    ]


def evaluation(
    result: dg.AssetCheckResult, asset_key: dg.AssetKey, partition: str, target: dg.EventLogRecord | None
) -> dg.AssetCheckEvaluation:
    """A check's result as the event a step logs for a partition it did not run the check for.

    `target` is the materialization judged (the partition's latest): the UI counts a verdict only
    while it names the partition's latest materialization.
    """
    assert result.check_name is not None
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=result.check_name,
        passed=result.passed,
        partition=partition,
        metadata=result.metadata,
        severity=result.severity,
        description=result.description,
        target_materialization_data=check_target(target) if target is not None else None,
    )

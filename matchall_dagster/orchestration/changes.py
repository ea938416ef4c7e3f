"""`segment_membership_changes`: who joined and who left a segment since its previous materialization.

Downstream of `segment_matches`, computed in the store's database (see `storage.history`) whenever a partition of
`segment_matches` is materialized, by its own automation sensor. Its numeric metadata (members,
joined, left, churn rate) feed the UI's plots; `membership_change_plausible` warns when too much
of a segment changed in one step, the mark of a broken segment definition.
"""

from datetime import UTC, datetime
from typing import Any

import dagster as dg

from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.metadata import RUN_ID
from matchall_dagster.orchestration.names import BATCH_TAG, PLAUSIBLE
from matchall_dagster.orchestration.preview import partitioned_checks
from matchall_dagster.settings import Settings, settings
from matchall_dagster.storage.history import CHANGES_TABLE, JOINED, LEFT, Step

__all__ = [
    "CHANGES_AUTOMATION",
    "CHANGES_COLUMNS",
    "MAX_SHARE_VARIABLE",
    "PLAUSIBLE",
    "build_changes",
    "changes_metadata",
    "describe",
    "plausibility",
    "step_source",
]

MAX_SHARE_VARIABLE = "MATCHALL_MAX_CHANGE_SHARE"
DEFAULT_MAX_SHARE = Settings.model_fields["max_change_share"].default


def plausibility(step: Step, max_share: float) -> dg.AssetCheckResult:
    metadata = {
        "joined": step.joined,
        "left": step.left,
        "previous_members": step.previous_members,
        "churn_rate": step.churn_rate,
        "max_change_share": max_share,
    }
    if step.first:
        description = "The segment's first step: every member joined; nothing to compare with."
        passed = True
    elif step.churn_rate > max_share:
        description = (
            f"{step.churn_rate:.0%} of segment {step.segment_id}'s {step.previous_members:,} members changed in one "
            f"step ({step.joined:,} joined, {step.left:,} left; more than {max_share:.0%}). Check the segment's "
            f"definition in ActiveCampaign: an edited or broken condition looks like this. If the change is real, "
            f"nothing needs doing; {MAX_SHARE_VARIABLE} sets the threshold."
        )
        passed = False
    else:
        description = f"{step.churn_rate:.1%} of the members changed (at most {max_share:.0%} expected)."
        passed = True
    return dg.AssetCheckResult(
        check_name=PLAUSIBLE,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata=metadata,
    )


def step_source(record: dg.EventLogRecord) -> str:
    """The key of the history step that compares a materialization of segment_matches: its Dagster run and
    storage id. A storage id alone is unique only within one Dagster instance, and the store can outlive
    the instance (SQLite to PostgreSQL, a reset): a reused id would be taken as already recorded."""
    return f"{record.run_id}/{record.storage_id}"


def describe(step: Step) -> str:
    """The step's log line."""
    if step.recorded:
        return (
            f"Segment {step.segment_id}: {step.members:,} members; {step.joined:,} joined and {step.left:,} left "
            f"since the previous materialization."
        )
    return (
        f"Segment {step.segment_id}: this materialization of segment_matches (run {step.run_id}) was already "
        f"recorded; nothing appended."
    )


def changes_metadata(step: Step) -> dict[str, Any]:
    """A materialization's metadata: the numbers the UI plots per partition."""
    return {
        "members": step.members,
        "joined": step.joined,
        "left": step.left,
        "churn_rate": step.churn_rate,
        "run_id": step.run_id,
        "observed_at": dg.MetadataValue.timestamp(step.observed_at),
        "appended": step.recorded,
    }


# Eager, once every blocking check of segment_matches (run_not_failed, run_not_expired, matches_complete)
# has passed on the partition: a failed or incomplete partition is never diffed. Except for the
# materializations of segment_matches made by a batch of small segments:
# the batch records their changes itself (see `small_reads`), so a run of this asset would be one
# process per segment again, for a step already recorded. Dagster's `executed_with_tags` looks at
# an asset's latest materialization over all partitions, so the updates are filtered by the tags of
# the runs that made them, per partition (`all_new_updates_have_run_tags`): such an update never
# triggers a run. A partition read for the first time is missing here, which triggers a run as soon
# as segment_matches has one; the batch materializes both milliseconds apart, and the last term keeps
# a tick that falls between the two from requesting it.
_FROM_BATCH = dg.AutomationCondition.all_new_updates_have_run_tags(tag_keys={BATCH_TAG})
CHANGES_AUTOMATION = (
    dg.AutomationCondition.eager().replace(
        "newly_updated_without_root",
        (
            dg.AutomationCondition.newly_updated() & ~dg.AutomationCondition.executed_with_root_target() & ~_FROM_BATCH
        ).with_label("newly_updated_without_root_or_batch"),
    )
    & ~dg.AutomationCondition.any_deps_match(_FROM_BATCH)
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("eager, once the blocking checks passed, except what a batch of small segments records")

CHANGES_COLUMNS = dg.TableSchema(
    columns=[
        dg.TableColumn("segment_id", "VARCHAR", description="The segment (the partition key)."),
        dg.TableColumn("contact_id", "BIGINT", description="The contact that joined or left."),
        dg.TableColumn("change", "VARCHAR", description=f"'{JOINED}' or '{LEFT}'."),
        dg.TableColumn("run_id", "VARCHAR", description="The match-all run whose members showed the change."),
        dg.TableColumn(
            "observed_at", "TIMESTAMP WITH TIME ZONE", description="When that read of segment_matches was stored."
        ),
    ]
)
CHANGES_DESCRIPTION = (
    "Contacts that joined or left the segment at each materialization of segment_matches "
    "(table segment_membership_changes: segment_id, contact_id, change, run_id, observed_at; appended only)."
)


def build_changes(account: Account) -> tuple[dg.AssetsDefinition, dg.AutomationConditionSensorDefinition]:
    """The account's `segment_membership_changes`, with its check, and the sensor that automates it."""
    with partitioned_checks():  # a preview feature: see `preview`
        plausible = dg.AssetCheckSpec(
            PLAUSIBLE,
            asset=account.changes_key,
            partitions_def=account.segments_partitions,
            description=f"Warns when more than {MAX_SHARE_VARIABLE} (default {DEFAULT_MAX_SHARE:.0%}) of a segment "
            "changed in one step.",
        )

    @dg.asset(
        key=account.changes_key,
        deps=[account.matches_key],
        partitions_def=account.segments_partitions,
        kinds={account.store_url().kind},
        automation_condition=CHANGES_AUTOMATION,
        check_specs=[plausible],
        required_resource_keys={account.store_resource},
        metadata={"dagster/column_schema": CHANGES_COLUMNS, "dagster/table_name": account.table_name(CHANGES_TABLE)},
        description=account.description("segment_membership_changes", CHANGES_DESCRIPTION),
        group_name=account.group_name,
        owners=list(account.owners) or None,
        tags=dict(account.tags) or None,
    )
    def segment_membership_changes(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]  # Dagster recognises only the bare class here
        segment_id = context.partition_key
        max_share = settings().max_change_share
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=account.matches_key, asset_partitions=[segment_id]), limit=1
        ).records
        if not records or records[0].asset_materialization is None:
            raise dg.Failure(
                description=f"Segment {segment_id} has no materialization of segment_matches yet; materialize it first."
            )
        source = records[0]
        metadata = source.asset_materialization.metadata
        run_id = metadata[RUN_ID].value if RUN_ID in metadata else ""
        step = account.membership_store(context).record_step(
            segment_id,
            source=step_source(source),
            run_id=str(run_id),
            observed_at=datetime.fromtimestamp(source.timestamp, UTC),
        )
        context.log.info(describe(step))
        return dg.MaterializeResult(metadata=changes_metadata(step), check_results=[plausibility(step, max_share)])

    sensor = dg.AutomationConditionSensorDefinition(
        account.name("membership_changes_automation"),
        target=dg.AssetSelection.assets(account.changes_key),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Computes segment_membership_changes after each new materialization of segment_matches whose "
        "blocking checks passed.",
    )
    return segment_membership_changes, sensor

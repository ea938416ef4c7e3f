"""Starting match-all runs: the kick-off job, its daily schedule, and the pending-run records.

Each started run is recorded as an `AssetObservation` of its `segment_matches` partition (a
`PendingRecord`: run id, sort, start time, kick-off id; see `pending_runs`), so the UI shows per
partition which run is pending since when, and the readiness sensor picks the runs up from the
event log.

Segments marked deleted (see `deletions`) are not started; a tracked segment whose start answers
404 is marked there and then. Names come from the catalog table (one local read per kick-off).

A kick-off is identified by the root run of its Dagster run (a re-execution shares it), so a
kick-off that was interrupted and is re-executed starts only the segments that have no pending
record of that kick-off yet.
"""

from collections.abc import Iterable

import dagster as dg
from pydantic import Field

from matchall_dagster.api.errors import (
    ActiveCampaignError,
    AuthenticationError,
    BudgetStoreError,
    SegmentNotFoundError,
)
from matchall_dagster.api.validation import DEFAULT_SORT, validate_sort
from matchall_dagster.lifecycle.record import PENDING, key
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.catalog import names_of, read_catalog
from matchall_dagster.orchestration.deletions import KICKOFF_404, deleted_ids, deleted_observation, mark_deleted
from matchall_dagster.orchestration.metadata import labelled
from matchall_dagster.orchestration.pending_runs import pending_observation, pending_record
from matchall_dagster.settings import ConfigurationError

__all__ = [
    "KICKOFF",
    "PENDING",
    "KickoffConfig",
    "build_kickoff",
    "kickoff_id",
    "pending_observation",
    "started_segments",
]

KICKOFF = key("kickoff")  # the metadata key of the kick-off's id in a pending-run record
RESUME_PAGE = 2_000
PROGRESS_EVERY = 1_000  # segments between progress lines (each run has its observation anyway)


def kickoff_id(run: dg.DagsterRun) -> str:
    """The id every attempt of one kick-off shares: the root run of its re-executions."""
    return run.root_run_id or run.get_root_run_id() or run.run_id


def started_segments(instance: dg.DagsterInstance, account: Account, kickoff: str) -> set[str]:
    """The segments whose runs earlier attempts of this kick-off (and this one) recorded as pending.

    Read where the readiness sensor reads them, the asset's observations (not the runs' own logs:
    on SQLite a process killed mid-write can leave an event in its run's log and not in the
    asset's index, and such a run would never be polled), from the kick-off's first run on.
    """
    root = instance.get_run_record_by_id(kickoff)
    since = root.create_timestamp.timestamp() - 60.0 if root is not None else None  # clocks of two processes
    started: set[str] = set()
    cursor = None
    while True:
        page = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=account.matches_key, after_timestamp=since),
            limit=RESUME_PAGE,
            cursor=cursor,
            ascending=True,
        )
        for record in page.records:
            pending = pending_record(record)
            if pending is not None and pending.kickoff == kickoff and record.partition_key is not None:
                started.add(record.partition_key)
        cursor = page.cursor
        if not page.has_more:
            return started


def _remaining(segment_ids: Iterable[str], started: set[str]) -> list[str]:
    seen: set[str] = set()
    remaining = []
    for segment_id in segment_ids:  # keeps the order; a segment listed twice is started once
        if segment_id not in started and segment_id not in seen:
            remaining.append(segment_id)
        seen.add(segment_id)
    return remaining


def _mark_deleted(context: dg.OpExecutionContext, account: Account, segment_id: str, name: str | None) -> None:
    """A tracked segment the API does not know any more: marked (not kicked off again), rows kept."""
    if not context.instance.has_dynamic_partition(account.partitions_name, segment_id):
        return  # an id given in the run configuration, never tracked: nothing to mark
    mark_deleted(context.instance, account, [segment_id])
    context.log_event(deleted_observation(account, segment_id, KICKOFF_404, name))


def _without_deleted(context: dg.OpExecutionContext, account: Account, segment_ids: list[str]) -> list[str]:
    """The segments not marked deleted (a marked one comes back when ActiveCampaign lists it again)."""
    deleted = deleted_ids(context.instance, account)
    skipped = [segment_id for segment_id in segment_ids if segment_id in deleted]
    if skipped:
        context.log.info(
            f"Skipped {len(skipped)} segment(s) marked deleted in ActiveCampaign: {', '.join(skipped[:20])}"
            f"{' ...' if len(skipped) > 20 else ''}. Each comes back once ActiveCampaign lists it again; "
            f"`matchall forget SEGMENT_ID` drops its partition."
        )
    return [segment_id for segment_id in segment_ids if segment_id not in deleted]


class KickoffConfig(dg.Config):
    sort: str = Field(default=DEFAULT_SORT, description="The sort of every run started. Empty: the account's.")
    segment_ids: list[str] | None = Field(
        default=None, description="Segments to start runs for; when empty, every tracked segment partition."
    )


def build_kickoff(account: Account) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The account's kick-off job and its schedule (`Account.kickoff_cron`)."""

    class AccountKickoffConfig(KickoffConfig):
        sort: str = Field(default=account.sort, description="The sort of every run started. Empty: the account's.")

    @dg.op(
        name=account.name("start_match_all_runs"),
        pool=account.pool,
        required_resource_keys={account.api_resource, account.store_resource},
        description="Start a match-all run for each tracked segment not marked deleted and record it as pending; a "
        "re-execution starts only the segments the interrupted attempt had not recorded. A segment answering 404 "
        "is marked deleted.",
    )
    def start_match_all_runs(context: dg.OpExecutionContext, config: AccountKickoffConfig) -> None:
        start_runs(context, account, config)

    @dg.job(
        name=account.name("match_all_kickoff_job"),
        description="Starts match-all runs for the tracked segments; the readiness sensor takes it from there.",
        tags=dict(account.tags) or None,
    )
    def match_all_kickoff_job() -> None:
        start_match_all_runs()

    return match_all_kickoff_job, _kickoff_schedule(account, match_all_kickoff_job)


def start_runs(context: dg.OpExecutionContext, account: Account, config: KickoffConfig) -> None:
    try:
        sort = validate_sort(config.sort or account.sort)
    except ActiveCampaignError as exc:
        raise dg.Failure(description=f"{exc} Fix the kick-off's run configuration.") from None
    names = names_of(read_catalog(account.membership_store(context)))  # one local read; empty without a catalog
    chosen = config.segment_ids or context.instance.get_dynamic_partitions(account.partitions_name)
    segment_ids = _without_deleted(context, account, account.segments.tracked(chosen, names, unknown_name=True))
    kickoff = kickoff_id(context.dagster_run)
    done = started_segments(context.instance, account, kickoff)  # empty unless this kick-off was interrupted
    todo = _remaining(segment_ids, done)
    if done:
        context.log.info(f"Resuming kick-off {kickoff}: {len(done)} segment(s) already started, {len(todo)} to start.")
    failures: dict[str, str] = {}
    started = 0
    with account.api(context).get_client() as client:  # each start takes its place in the account's budget
        for segment_id in todo:
            try:
                run = client.start_run(segment_id, sort=sort)
            except SegmentNotFoundError as exc:
                context.log.warning(f"Skipped {labelled(segment_id, names.get(segment_id))}: {exc}")
                _mark_deleted(context, account, segment_id, names.get(segment_id))
                continue
            except (AuthenticationError, BudgetStoreError) as exc:  # the same for every segment: stop at once
                raise dg.Failure(description=str(exc)) from None
            except ActiveCampaignError as exc:
                context.log.error(f"Could not start a run of segment {segment_id}: {exc}")
                failures[segment_id] = str(exc)
                continue
            # The one window where an interruption makes a re-execution start a segment twice: from
            # this start request reaching the API to the record below being stored (a round trip
            # and one write); one segment at most, since segments are started one after the other.
            name = names.get(segment_id)
            context.log_event(pending_observation(account, segment_id, run, sort, kickoff=kickoff, name=name))
            started += 1
            if started % PROGRESS_EVERY == 0:
                context.log.info(f"Started {started} of {len(todo)} run(s).")
        waited = client.budget.waited_seconds
    context.log.info(
        f"Started runs for {started} of {len(segment_ids)} segment(s)"
        + (f" ({len(segment_ids) - len(todo)} started by an earlier attempt)." if done else ".")
        + f" {waited:.0f} s went to waiting for places in the account's request budget ({client.budget.store})."
        + " The readiness sensor polls them from its next tick and materializes each once it is ready."
    )
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(segment_ids)} segment(s) could not be started; see the log. "
            f"Re-execute this run once the API answers: a re-execution starts only the segments not started yet "
            f"(a new kick-off would start every segment again).",
            metadata={"failed_segments": sorted(failures)},
        )


def _kickoff_schedule(account: Account, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    cron = account.kickoff_cron
    try:
        return dg.ScheduleDefinition(
            name=account.name("match_all_kickoff_schedule"),
            job=job,
            cron_schedule=cron,
            execution_timezone="UTC",
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"A fresh match-all run for every tracked segment of {account.label}, on {cron!r} (UTC).",
        )
    except dg.DagsterInvalidDefinitionError:
        raise ConfigurationError(
            f"kickoff_cron (MATCHALL_KICKOFF_CRON): {cron!r} is not a cron expression Dagster accepts (five fields, "
            f"such as '0 6 * * *'). Fix it."
        ) from None

"""Starting match-all runs: the kick-off job, its daily schedule, and the pending-run records.

Each started run is recorded as an `AssetObservation` of its `segment_matches` partition
(status `pending`, run id, sort, start time), so the UI shows per partition which run is
pending since when, and the readiness sensor picks the runs up from the event log.
"""

import os

import dagster as dg
from pydantic import Field

from matchall_dagster.checks import API_POOL, ASSET_KEY, run_metadata
from matchall_dagster.errors import ActiveCampaignError, AuthenticationError, SegmentNotFoundError
from matchall_dagster.models import MatchAllRun
from matchall_dagster.partitions import segments_partitions, tracked
from matchall_dagster.resource import ActiveCampaignResource
from matchall_dagster.validation import DEFAULT_SORT, validate_sort

STATUS = "matchall/status"
PENDING = "pending"
ATTEMPT = "attempt"
KICKOFF_CRON_VARIABLE = "MATCHALL_KICKOFF_CRON"


def pending_observation(segment_id: str, run: MatchAllRun, sort: str, attempt: int = 1) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=ASSET_KEY,
        partition=segment_id,
        description=f"Match-all run {run.run_id} pending since {run.run_id_start:%Y-%m-%d %H:%M:%S} UTC.",
        metadata={STATUS: PENDING, ATTEMPT: attempt, **run_metadata(run, run.run_id, sort)},
    )


class KickoffConfig(dg.Config):
    sort: str = Field(default=DEFAULT_SORT, description="The sort of every run started.")
    segment_ids: list[str] | None = Field(
        default=None, description="Segments to start runs for; when empty, every tracked segment partition."
    )


@dg.op(pool=API_POOL, description="Start a match-all run for each tracked segment and record it as pending.")
def start_match_all_runs(
    context: dg.OpExecutionContext, config: KickoffConfig, activecampaign: ActiveCampaignResource
) -> None:
    try:
        sort = validate_sort(config.sort)
    except ActiveCampaignError as exc:
        raise dg.Failure(description=f"{exc} Fix the kick-off's run configuration.") from None
    assert segments_partitions.name is not None
    segment_ids = tracked(config.segment_ids or context.instance.get_dynamic_partitions(segments_partitions.name))
    failures: dict[str, str] = {}
    started = 0
    with activecampaign.get_client() as client:
        for segment_id in segment_ids:
            try:
                run = client.start_run(segment_id, sort=sort)
            except SegmentNotFoundError as exc:
                context.log.warning(f"Skipped segment {segment_id}: {exc}")
                continue
            except AuthenticationError as exc:  # the same for every segment: stop at once
                raise dg.Failure(description=str(exc)) from None
            except ActiveCampaignError as exc:
                context.log.error(f"Could not start a run of segment {segment_id}: {exc}")
                failures[segment_id] = str(exc)
                continue
            context.log_event(pending_observation(segment_id, run, sort))
            context.log.info(f"Started run {run.run_id} of segment {segment_id}.")
            started += 1
    context.log.info(f"Started runs for {started} of {len(segment_ids)} segment(s).")
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(segment_ids)} segment(s) could not be started; see the log. "
            f"Launch the kick-off again once the API answers.",
            metadata={"failed_segments": sorted(failures)},
        )


@dg.job(description="Starts match-all runs for the tracked segments; the readiness sensor takes it from there.")
def match_all_kickoff_job() -> None:
    start_match_all_runs()


match_all_kickoff_schedule = dg.ScheduleDefinition(
    name="match_all_kickoff_schedule",
    job=match_all_kickoff_job,
    cron_schedule=os.environ.get(KICKOFF_CRON_VARIABLE, "0 6 * * *"),
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: a fresh match-all run for every tracked segment (cron from MATCHALL_KICKOFF_CRON).",
)

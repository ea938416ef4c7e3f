"""The kick-off job and its schedule: runs started and recorded as pending, per partition."""

from __future__ import annotations

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignResource
from matchall_dagster.checks import ASSET_KEY
from matchall_dagster.kickoff import PENDING, STATUS
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimulatorServer


def kickoff(
    instance: dg.DagsterInstance, defs: dg.Definitions, resources: dict[str, object] | None = None, **config: object
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("match_all_kickoff_job")
    return job.execute_in_process(
        instance=instance,
        resources={**(defs.resources or {}), **(resources or {})},
        run_config={"ops": {"start_match_all_runs": {"config": config}}},
        raise_on_error=False,
    )


def pending_by_partition(instance: dg.DagsterInstance) -> dict[str, dict[str, object]]:
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=ASSET_KEY), limit=100, ascending=True)
    found: dict[str, dict[str, object]] = {}
    for record in records.records:
        assert record.asset_observation is not None
        metadata: dict[str, object] = {key: value.value for key, value in record.asset_observation.metadata.items()}
        if metadata[STATUS] == PENDING and record.partition_key is not None:
            found[record.partition_key] = metadata
    return found


def test_every_tracked_partition_gets_a_run_recorded_as_pending(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance.add_dynamic_partitions("segments", ["1", "10001", "25001"])
    monkeypatch.setenv("MATCHALL_SEGMENTS", "1,25001")
    result = kickoff(instance, defs, sort="-cdate")
    assert result.success
    pending = pending_by_partition(instance)
    assert set(pending) == {"1", "25001"}
    started = {run.run_id: run for run in server.simulator.runs.values()}
    for segment_id, metadata in pending.items():
        run = started[str(metadata["run_id"])]
        assert (run.segment.id, run.sort, metadata["sort"]) == (segment_id, "-cdate", "-cdate")
        assert isinstance(metadata["run_started_at"], float)


def test_unknown_segments_are_skipped_and_api_failures_fail_the_job_after_the_others(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    result = kickoff(instance, defs, segment_ids=["1", "gone-404", "10001"])
    assert result.success  # a segment deleted in ActiveCampaign is not an error of ours
    assert set(pending_by_partition(instance)) == {"1", "10001"}

    server.simulator.set_faults(Faults(error_rate=1.0))
    impatient = ActiveCampaignResource(api_url=server.url, api_key=DEFAULT_TOKEN, max_retries=0)
    failed = kickoff(instance, defs, {"activecampaign": impatient}, segment_ids=["25001"])
    assert not failed.success
    failure = failed.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None
    assert "1 of 1 segment(s) could not be started" in failure.message


def test_a_refused_token_stops_the_kickoff_at_the_first_segment(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    refused = ActiveCampaignResource(api_url=server.url, api_key="not-the-token")
    result = kickoff(instance, defs, {"activecampaign": refused}, segment_ids=["1", "10001", "25001"])
    assert not result.success
    assert server.simulator.stats()["requests"] == 1
    failure = result.get_step_failure_events()[0].step_failure_data
    assert failure.user_failure_data is not None
    assert "refused the API token" in str(failure.user_failure_data.description)
    assert "not-the-token" not in str(failure.user_failure_data.description)


def test_a_bad_sort_fails_before_any_request(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    result = kickoff(instance, defs, sort="name", segment_ids=["1"])
    assert not result.success
    assert server.simulator.stats()["requests"] == 0


def test_the_schedule_requests_the_kickoff_daily(instance: dg.DagsterInstance, defs: dg.Definitions) -> None:
    schedule = defs.resolve_schedule_def("match_all_kickoff_schedule")
    assert schedule.cron_schedule == "0 6 * * *"
    assert schedule.default_status is dg.DefaultScheduleStatus.RUNNING
    with dg.build_schedule_context(instance=instance) as context:
        data = schedule.evaluate_tick(context)
    assert data.run_requests is not None
    assert len(data.run_requests) == 1
    assert schedule.job_name == "match_all_kickoff_job"

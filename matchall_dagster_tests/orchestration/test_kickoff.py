"""The kick-off job and its schedule: runs started and recorded as pending, per partition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignClient, ActiveCampaignResource
from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.definitions import account_definitions, build_definitions
from matchall_dagster.lifecycle.record import STATUS, key
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.deletions import KICKOFF_404
from matchall_dagster.orchestration.kickoff import KICKOFF, PENDING
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimAccount, SimSegment, SimulatorServer
from matchall_dagster_tests.conftest import ServeSimulator, materialize_catalog, set_setting

REPO = Path(__file__).resolve().parents[2]


def kickoff(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    resources: Mapping[str, object] | None = None,
    tags: dict[str, str] | None = None,
    **config: object,
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("match_all_kickoff_job")
    return job.execute_in_process(
        instance=instance,
        resources={**(defs.resources or {}), **(resources or {})},
        run_config={"ops": {"start_match_all_runs": {"config": config}}},
        raise_on_error=False,
        tags=tags,
    )


def pending_by_partition(instance: dg.DagsterInstance) -> dict[str, dict[str, object]]:
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=DEFAULT_ACCOUNT.matches_key), limit=100, ascending=True
    )
    found: dict[str, dict[str, object]] = {}
    for record in records.records:
        assert record.asset_observation is not None
        metadata: dict[str, object] = {key: value.value for key, value in record.asset_observation.metadata.items()}
        if metadata[STATUS] == PENDING and record.partition_key is not None:
            found[record.partition_key] = metadata
    return found


def test_every_tracked_partition_gets_a_run_recorded_as_pending(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    server: SimulatorServer,
    duckdb_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance.add_dynamic_partitions("segments", ["1", "10001", "25001"])
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", "1,25001")
    defs = build_definitions(store=str(duckdb_file))  # MATCHALL_SEGMENTS is read as the definitions are built
    result = kickoff(instance, defs, sort="-cdate")
    assert result.success
    pending = pending_by_partition(instance)
    assert set(pending) == {"1", "25001"}
    started = {run.run_id: run for run in server.simulator.runs.values()}
    for segment_id, metadata in pending.items():
        run = started[str(metadata[key("run_id")])]
        assert (run.segment.id, run.sort, metadata[key("sort")]) == (segment_id, "-cdate", "-cdate")
        assert isinstance(metadata[key("run_started_at")], float)


def test_unknown_segments_are_skipped_and_api_failures_fail_the_job_after_the_others(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    result = kickoff(instance, defs, segment_ids=["1", "gone-404", "10001"])
    assert result.success  # a segment deleted in ActiveCampaign is not an error of ours
    assert set(pending_by_partition(instance)) == {"1", "10001"}
    assert instance.get_dynamic_partitions("deleted_segments") == []  # never tracked: nothing to mark

    server.simulator.set_faults(Faults(error_rate=1.0))
    impatient = ActiveCampaignResource(api_url=server.url, api_key=DEFAULT_TOKEN, max_retries=0)
    failed = kickoff(instance, defs, {"activecampaign": impatient}, segment_ids=["25001"])
    assert not failed.success
    failure = failed.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None
    assert "1 of 1 segment(s) could not be started" in failure.message


def test_a_tracked_segment_answering_404_is_marked_deleted_and_skipped_by_the_next_kickoff(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, duckdb_file: Path
) -> None:
    instance.add_dynamic_partitions("segments", ["1", "10001"])
    materialize_catalog(defs, instance)
    name = next(s.name for s in server.simulator.account.segments if s.id == "10001")
    server.simulator.account.segments = [s for s in server.simulator.account.segments if s.id != "10001"]
    assert kickoff(instance, defs).success
    assert instance.get_dynamic_partitions("deleted_segments") == ["10001"]
    assert "10001" in instance.get_dynamic_partitions("segments")  # the partition (and its rows) stay
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=DEFAULT_ACCOUNT.matches_key, asset_partitions=["10001"]), limit=5
    ).records
    (record,) = records
    assert record.asset_observation is not None
    metadata = {key: entry.value for key, entry in record.asset_observation.metadata.items()}
    assert metadata == {STATUS: "deleted", key("reason"): KICKOFF_404, key("segment_name"): name}
    assert f'segment 10001 "{name}"' in str(record.asset_observation.description)
    assert "matchall forget 10001" in str(record.asset_observation.description)

    server.simulator.reset_stats()
    again = kickoff(instance, defs)
    assert again.success
    assert server.simulator.stats()["requests"] == 1  # segment 1 only
    assert any("Skipped 1 segment(s) marked deleted" in entry.user_message for entry in instance.all_logs(again.run_id))


def test_pending_runs_carry_the_segment_s_name_from_the_catalog(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    instance.add_dynamic_partitions("segments", ["1", "25001"])
    assert kickoff(instance, defs).success  # no catalog yet: no names, and no failure
    assert all(key("segment_name") not in metadata for metadata in pending_by_partition(instance).values())
    materialize_catalog(defs, instance)
    assert kickoff(instance, defs).success
    names = {s.id: s.name for s in server.simulator.account.segments}
    pending = pending_by_partition(instance)
    assert {segment_id: metadata[key("segment_name")] for segment_id, metadata in pending.items()} == {
        "1": names["1"],
        "25001": names["25001"],
    }


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


# -- resuming an interrupted kick-off ------------------------------------------------------------


def runs_by_segment(server: SimulatorServer) -> Counter[str]:
    return Counter(run.segment.id for run in server.simulator.runs.values())


def pending_of_kickoff(instance: dg.DagsterInstance, kickoff: str) -> Counter[str]:
    """How many pending records each segment has from this kick-off."""
    found: Counter[str] = Counter()
    cursor = None
    while True:
        page = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=DEFAULT_ACCOUNT.matches_key), limit=1_000, cursor=cursor, ascending=True
        )
        for record in page.records:
            assert record.asset_observation is not None
            metadata = record.asset_observation.metadata
            if metadata[STATUS].value == PENDING and metadata[KICKOFF].value == kickoff:
                found[str(record.partition_key)] += 1
        cursor = page.cursor
        if not page.has_more:
            return found


class _InjectedCrashError(Exception):
    """Raised right after a run was started at the API, before its record: the kick-off's worst moment."""


def test_a_reexecuted_kickoff_starts_only_what_the_interrupted_one_had_not_recorded(
    instance: dg.DagsterInstance,
    serve_simulator: ServeSimulator,
    monkeypatch: pytest.MonkeyPatch,
    duckdb_file: Path,
) -> None:
    segments = [str(i) for i in range(1, 61)]
    server = serve_simulator(SimAccount([SimSegment(s, f"S{s}", 3) for s in segments]))
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    defs = build_definitions(store=str(duckdb_file))
    fast = {
        "activecampaign": ActiveCampaignResource(api_url=server.url, api_key=DEFAULT_TOKEN, requests_per_second=100)
    }
    real_start = ActiveCampaignClient.start_run
    calls = 0

    def start_then_crash_at_the_25th(self: ActiveCampaignClient, *args: Any, **kwargs: Any) -> MatchAllRun:
        nonlocal calls
        run = real_start(self, *args, **kwargs)
        calls += 1
        if calls == 25:
            raise _InjectedCrashError("the process died here")
        return run

    monkeypatch.setattr(ActiveCampaignClient, "start_run", start_then_crash_at_the_25th)
    first = kickoff(instance, defs, fast, segment_ids=segments)
    assert not first.success
    assert sum(runs_by_segment(server).values()) == 25
    assert sum(pending_of_kickoff(instance, first.run_id).values()) == 24

    monkeypatch.setattr(ActiveCampaignClient, "start_run", real_start)
    tags = {"dagster/parent_run_id": first.run_id, "dagster/root_run_id": first.run_id}  # as a re-execution has
    second = kickoff(instance, defs, fast, tags=tags, segment_ids=segments)
    assert second.success
    # Every segment recorded once for this kick-off; started once at the API, but for the one
    # whose run was started when the process died and not yet recorded.
    assert pending_of_kickoff(instance, first.run_id) == Counter(segments)
    started = runs_by_segment(server)
    assert started == Counter(segments) + Counter(["25"])
    again = kickoff(instance, defs, fast, tags=tags, segment_ids=segments)  # a third attempt starts nothing
    assert again.success
    assert runs_by_segment(server) == started


def test_a_new_kickoff_starts_every_segment_again(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    first = kickoff(instance, defs, segment_ids=["1", "10001"])
    second = kickoff(instance, defs, segment_ids=["1", "10001"])  # tomorrow's: not a re-execution
    assert first.success
    assert second.success
    assert runs_by_segment(server) == Counter({"1": 2, "10001": 2})
    assert pending_of_kickoff(instance, second.run_id) == Counter({"1": 1, "10001": 1})


def kickoff_job_for_subprocess() -> dg.JobDefinition:
    """The project's kick-off job with its resources, rebuilt in another process (from the
    environment: the simulator's URL, the rate of KICKOFF_TEST_RATE)."""
    resource = ActiveCampaignResource(
        api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"),
        api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY"),
        requests_per_second=float(os.environ.get("KICKOFF_TEST_RATE", "5")),
    )
    defs = account_definitions(DEFAULT_ACCOUNT, resource)  # its store: MATCHALL_STORE
    return defs.resolve_job_def("match_all_kickoff_job")


_RUN_KICKOFF = """
import sys
import dagster as dg
job = dg.build_reconstructable_job(
    "matchall_dagster_tests.orchestration.test_kickoff",
    "kickoff_job_for_subprocess",
    reconstructor_working_directory=sys.argv[2],
)
with dg.DagsterInstance.get() as instance:
    config = {"ops": {"start_match_all_runs": {"config": {"segment_ids": sys.argv[1].split(",")}}}}
    dg.execute_job(job, instance, run_config=config)
"""


def test_a_killed_kickoff_process_resumes_on_reexecution_within_the_limit(
    tmp_path: Path, serve_simulator: ServeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's process is killed (SIGKILL) part-way; re-executed from failure, the kick-off starts
    only the segments without a record; both processes take from the budget in DAGSTER_HOME, so
    the account's 5 requests/s hold across the kill."""
    segments = [str(i) for i in range(1, 41)]
    server = serve_simulator(SimAccount([SimSegment(s, f"S{s}", 3) for s in segments]), requests_per_second=5)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ACTIVECAMPAIGN_API_URL": server.url,
        "ACTIVECAMPAIGN_API_KEY": DEFAULT_TOKEN,
        "KICKOFF_TEST_RATE": "5",
    }
    for name, value in env.items():
        if name in ("DAGSTER_HOME", "ACTIVECAMPAIGN_API_URL", "ACTIVECAMPAIGN_API_KEY", "KICKOFF_TEST_RATE"):
            monkeypatch.setenv(name, value)
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_KICKOFF, ",".join(segments), str(REPO)], env=env, cwd=REPO, start_new_session=True
    )
    with dg.DagsterInstance.get() as instance:
        try:
            deadline = time.monotonic() + 120
            while len(server.simulator.runs) < 15 and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.05)
            assert process.poll() is None, "the kick-off process ended before it could be killed"
            os.killpg(process.pid, signal.SIGKILL)  # the run process and its step process
        finally:
            process.wait(timeout=30)
        killed_at = len(server.simulator.runs)
        assert 15 <= killed_at < len(segments)
        (run,) = instance.get_runs()
        assert run.status is dg.DagsterRunStatus.STARTED  # as a killed process leaves it
        instance.report_run_failed(run, message="The run's process was killed.")  # what run monitoring does
        result = dg.execute_job(
            dg.build_reconstructable_job(
                "matchall_dagster_tests.orchestration.test_kickoff",
                "kickoff_job_for_subprocess",
                reconstructor_working_directory=str(REPO),
            ),
            instance,
            reexecution_options=dg.ReexecutionOptions.from_failure(run.run_id, instance),
        )
        assert result.success
        assert pending_of_kickoff(instance, run.run_id) == Counter(segments)
    started = runs_by_segment(server)
    twice = [segment for segment, count in started.items() if count > 1]
    assert set(started) == set(segments)
    assert len(twice) <= 1  # at most the one started when the process died, before its record
    assert sum(started.values()) == len(segments) + len(twice)
    stats = server.simulator.stats()
    assert stats["max_requests_in_any_second"] <= 5
    assert stats["by_status"] == {200: len(segments) + len(twice)}  # no 429
    assert (home / "matchall-request-budget.sqlite").exists()

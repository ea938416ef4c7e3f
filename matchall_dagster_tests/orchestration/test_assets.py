"""`segment_matches` and its checks, run by Dagster in process against the simulator and the store.

Every test materializes through `dg.materialize` (or executes the project's jobs) on a test
instance, talks to a simulator over real HTTP on 127.0.0.1, and reads the stored rows back from
the store: a DuckDB file, and for the tests where the engine matters (`store_url`) a PostgreSQL
schema too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignClient, ActiveCampaignResource, MatchAllRun
from matchall_dagster.api.validation import DEFAULT_SORT
from matchall_dagster.definitions import build_definitions
from matchall_dagster.orchestration.assets import size_note
from matchall_dagster.orchestration.catalog import read_catalog
from matchall_dagster.orchestration.names import MATCHES_COMPLETE, PLAUSIBLE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.simulator import DEFAULT_TOKEN, Behavior, SimAccount, SimSegment, SimulatorServer
from matchall_dagster.storage.store import StoreUrl, open_store
from matchall_dagster_tests.conftest import (
    CHECKS,
    UUID_SEGMENT,
    ServeSimulator,
    apply_tick,
    materialize_catalog,
    materialize_segment,
    sensor_context,
    set_setting,
)
from matchall_dagster_tests.orchestration.stores import execute, failing_before_commit, stored, table_exists

ASSET_KEY = dg.AssetKey("segment_matches")
DAY = 86_400.0
BIG_SEGMENT = "250000"


# -- helpers ----------------------------------------------------------------------------------


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def recorded_evaluation(
    instance: dg.DagsterInstance, check_name: str, segment_id: str, run_id: str
) -> dg.AssetCheckEvaluation:
    """The evaluation of a check that the instance recorded for a partition in one Dagster run."""
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(ASSET_KEY, check_name), limit=100
    )
    for record in history:
        if (
            record.partition == segment_id
            and record.run_id == run_id
            and record.status.value in ("SUCCEEDED", "FAILED")
        ):
            evaluation = record.evaluation
            assert isinstance(evaluation, dg.AssetCheckEvaluation)
            assert (record.status.value == "SUCCEEDED") == evaluation.passed
            return evaluation
    raise AssertionError(f"no evaluation of {check_name} recorded for partition {segment_id} in run {run_id}")


JOBS = {"1": "read_small_segments", "10001": "segment_matches_job"}  # one page, or more


def partition_materializations(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, dict[str, Any]]:
    """The metadata of each partition of `asset` materialized in the run (an asset run's or a batch's)."""
    found = {}
    for event in result.get_asset_materialization_events():
        logged = event.step_materialization_data.materialization
        if logged.asset_key == dg.AssetKey(asset) and logged.partition is not None:
            found[logged.partition] = {key: value.value for key, value in logged.metadata.items()}
    return found


def partition_evaluations(result: dg.ExecuteInProcessResult, partition: str) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        evaluation.check_name: evaluation
        for evaluation in result.get_asset_check_evaluations()
        if evaluation.partition in (partition, None)
    }


def materialization(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (event,) = result.asset_materializations_for_node("segment_matches")
    return {key: value.value for key, value in event.metadata.items()}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [event for event in result.all_events if event.is_step_failure]
    data = event.step_failure_data
    assert data.user_failure_data is not None
    return str(data.user_failure_data.description)


def set_catalog(store: str | Path, segment_id: str, **values: Any) -> None:
    """Change a segment's catalog row, as a later listing could have counted it."""
    for column, value in values.items():
        execute(store, f"update activecampaign_segments set {column} = ? where segment_id = ?", [value, segment_id])


def fast_resource(server: SimulatorServer, **options: Any) -> ActiveCampaignResource:
    """The resource as configured in definitions, but not bound by the account's 5/s (the
    simulators of these tests have no limit)."""
    options.setdefault("requests_per_second", 1000)
    return ActiveCampaignResource(api_url=server.url, api_key=DEFAULT_TOKEN, **options)


def with_resource(defs: dg.Definitions, activecampaign: ActiveCampaignResource) -> dict[str, Any]:
    return {**(defs.resources or {}), "activecampaign": activecampaign}


def set_behavior(server: SimulatorServer, segment_id: str, behavior: Behavior) -> None:
    """What happens to a segment whose definition breaks (or is mended) in the account."""
    account = server.simulator.account
    account.segments = [replace(s, behavior=behavior) if s.id == segment_id else s for s in account.segments]


# -- rows equal the ground truth --------------------------------------------------------------


@pytest.mark.parametrize("segment_id", ["100", "1", "10000", "10001", UUID_SEGMENT])
def test_rows_equal_the_ground_truth_in_position_order(
    store_defs: dg.Definitions,
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    store_url: str,
    segment_id: str,
) -> None:
    """On each engine: the rows (none for the empty segment), the storage metadata, the checks' verdicts."""
    result = materialize_segment(store_defs, instance, segment_id)
    truth = server.simulator.truth(segment_id)
    assert stored(store_url, segment_id) == truth
    metadata = materialization(result)
    assert metadata["dagster/row_count"] == metadata["dagster/partition_row_count"] == len(truth)
    url = StoreUrl.parse(store_url)
    assert metadata["dagster/storage_kind"] == url.kind
    assert metadata["dagster/table_name"] == f"{url.database}.{url.schema}.segment_matches"
    assert all(evaluation.passed for evaluation in evaluations(result).values())


def test_a_rematerialization_replaces_the_partition_and_a_failed_write_keeps_the_previous_rows(
    store_defs: dg.Definitions,
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    store_url: str,
) -> None:
    """On each engine, through the IO manager: another sort replaces the partition's rows (not appended,
    the partition beside it untouched); a write that fails after its rows are in, before its commit,
    fails the run and leaves the previous rows exactly; an empty answer empties the partition."""
    assert materialize_segment(store_defs, instance, "10001").success
    assert materialize_segment(store_defs, instance, "1").success
    materialize_segment(store_defs, instance, "10001", {"sort": "-email"})
    resorted = server.simulator.truth("10001", "-email")
    assert resorted != server.simulator.truth("10001")
    assert stored(store_url, "10001") == resorted
    assert stored(store_url, "1") == server.simulator.truth("1")

    with failing_before_commit(store_url, "replace_partition") as written:
        failed = materialize_segment(store_defs, instance, "10001", {"sort": "email"}, raise_on_error=False)
    assert not failed.success
    (failure,) = failed.get_step_failure_events()
    assert "No space left on device (injected)" in str(failure.step_failure_data.error)
    assert written == [10_001]
    assert not failed.asset_materializations_for_node("segment_matches")
    assert stored(store_url, "10001") == resorted

    # A segment whose every member leaves: its next read is empty, and so is its partition.
    server.simulator.account.segments.append(SimSegment("vanishing", "Vanishing", 3, churn=1.0, growth=-1.0))
    materialize_segment(store_defs, instance, "vanishing")
    assert len(stored(store_url, "vanishing")) == 3
    emptied = materialize_segment(store_defs, instance, "vanishing")
    assert materialization(emptied)["dagster/row_count"] == 0
    assert all(evaluation.passed for evaluation in evaluations(emptied).values())
    assert stored(store_url, "vanishing") == []
    assert stored(store_url, "10001") == resorted


def test_a_quarter_million_members_equal_the_ground_truth(
    serve_simulator: ServeSimulator, instance: dg.DagsterInstance, duckdb_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve_simulator(SimAccount([SimSegment(BIG_SEGMENT, "Engaged", 250_000)], seed=11))
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    defs = build_definitions(store=str(duckdb_file))
    resources = with_resource(defs, fast_resource(server))  # 27 requests: not at the account's 4/s
    result = materialize_segment(defs, instance, BIG_SEGMENT, {"sort": "-email"}, resources=resources)
    assert stored(duckdb_file, BIG_SEGMENT) == server.simulator.truth(BIG_SEGMENT, "-email")
    metadata = materialization(result)
    assert metadata["dagster/row_count"] == metadata["page_total"] == 250_000
    assert metadata["pages_read"] == 25
    assert evaluations(result)[MATCHES_COMPLETE].passed


# -- manual materializations ------------------------------------------------------------------


def test_manual_materialization_starts_a_run_in_the_chosen_sort_and_records_it(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    sort = "last_name,-first_name"
    result = materialize_segment(defs, instance, "10001", {"sort": sort})

    assert stored(duckdb_file, "10001") == server.simulator.truth("10001", sort)
    (run,) = server.simulator.runs.values()  # the asset started exactly one run, in that sort
    assert run.sort == sort
    metadata = materialization(result)
    assert metadata["dagster/row_count"] == metadata["page_total"] == 10_001
    assert metadata["run_id"] == run.run_id
    assert metadata["sort"] == sort
    assert metadata["run_started_at"] == pytest.approx(run.started_at, abs=0.001)
    assert metadata["run_ended_at"] == pytest.approx(run.ready_at, abs=0.001)
    segment = server.simulator.account.segment("10001")
    assert segment is not None
    assert metadata["segment_timestamp"] == server.simulator.account.segment_timestamp(segment).timestamp()
    assert metadata["pages_read"] == 2
    assert metadata["restarts"] == 0
    assert isinstance(metadata["requests"], int)
    assert metadata["requests"] >= 1
    assert isinstance(metadata["elapsed_seconds"], float)
    assert 0 <= metadata["elapsed_seconds"] < 60
    head = server.simulator.truth("10001", sort)[:10]
    preview = metadata["preview"]
    assert isinstance(preview, str)
    assert preview.splitlines()[2:12] == [f"| {i} | {cid} |" for i, cid in enumerate(head, 1)]
    assert "(9,991 more)" in preview

    checks = evaluations(result)
    assert set(checks) == set(CHECKS)
    for name in CHECKS:
        assert checks[name].passed, name
        assert checks[name].partition == "10001"
        assert recorded_evaluation(instance, name, "10001", result.run_id).passed


def test_a_materialization_names_its_segment_and_notes_a_size_far_from_the_catalog_s(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    plain = materialization(materialize_segment(defs, instance, "10001"))  # no catalog yet: no name, no failure
    assert not {"segment_name", "expected_total", "size_note"} & set(plain)

    materialize_catalog(defs, instance)
    entry = read_catalog(open_store(str(duckdb_file)), ["10001"])["10001"]
    set_catalog(duckdb_file, "10001", last_total=10_001, last_run_id="r-0")  # as the listing counts it
    result = materialize_segment(defs, instance, "10001")
    metadata = materialization(result)
    assert metadata["segment_name"] == entry.name
    assert (metadata["expected_total"], metadata["expected_total_run_id"]) == (10_001, "r-0")
    assert "size_note" not in metadata  # the count and the read agree
    logs = [log.user_message for log in instance.all_logs(result.run_id)]
    assert any(f'of segment 10001 "{entry.name}"' in message for message in logs)

    set_catalog(duckdb_file, "10001", last_total=5_000, last_run_id="r-1")  # an older, smaller count
    result = materialize_segment(defs, instance, "10001")
    assert result.success  # a cached count never fails a read
    metadata = materialization(result)
    assert metadata["expected_total"] == 5_000
    assert "Read 10,001 members where ActiveCampaign's latest count was 5,000 (+5,001" in metadata["size_note"]
    assert any("latest count was 5,000" in log.user_message for log in instance.all_logs(result.run_id))


@pytest.mark.parametrize(
    ("total", "expected", "noted"),
    [
        (10_001, 10_001, False),
        (1_050, 1_000, False),
        (1_150, 1_000, True),
        (0, 1_000, True),
        (15, 0, True),
        (5, 0, False),
    ],
)
def test_the_size_note_threshold(total: int, expected: int, noted: bool) -> None:
    assert (size_note(total, expected) is not None) is noted


def test_materialization_reads_an_existing_run_without_starting_another(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN) as client:
        run = client.start_run(UUID_SEGMENT, sort="-phone")
    result = materialize_segment(defs, instance, UUID_SEGMENT, {"run_id": run.run_id, "sort": "-phone"})
    assert stored(duckdb_file, UUID_SEGMENT) == server.simulator.truth(UUID_SEGMENT, "-phone")
    assert list(server.simulator.runs) == [run.run_id]
    metadata = materialization(result)
    assert metadata["run_id"] == run.run_id
    assert metadata["run_started_at"] == pytest.approx(run.run_id_start.timestamp())
    assert all(evaluation.passed for evaluation in evaluations(result).values())


def test_requests_metadata_counts_every_request_of_the_materialization(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer
) -> None:
    result = materialize_segment(defs, instance, "10001")  # start, page 1 (ready), page 2
    assert materialization(result)["requests"] == server.simulator.stats()["requests"] == 3


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sort": "name"}, r"The sort 'name' has an unknown key 'name'\..*Fix the run configuration"),
        ({"sort": "last_name, -first_name"}, r"unknown key ' -first_name'"),
        ({"sort": ","}, r"The sort ',' has an unknown key ''"),
        ({"run_id": "../runs"}, r"The run id '\.\./runs' is not a valid ActiveCampaign id"),
    ],
    ids=["unknown-key", "space", "empty-key", "run-id"],
)
def test_invalid_run_config_fails_the_run_with_a_clear_message_and_sends_nothing(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    duckdb_file: Path,
    config: dict[str, str],
    message: str,
) -> None:
    result = materialize_segment(defs, instance, "10001", config, raise_on_error=False)
    assert not result.success
    assert server.simulator.stats()["requests"] == 0
    assert re.search(message, failure_message(result))
    assert not result.asset_materializations_for_node("segment_matches")
    assert not table_exists(duckdb_file, "segment_matches")


@pytest.mark.parametrize("config", [{}, {"sort": ""}], ids=["left-out", "empty"])
def test_a_sort_left_out_or_empty_is_the_account_s_sort(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, config: dict[str, str]
) -> None:
    """The launchpad's sort, left empty, is the account's (DEFAULT_SORT): no longer refused as empty."""
    result = materialize_segment(defs, instance, "10001", config)
    assert result.success
    (run,) = server.simulator.runs.values()
    assert run.sort == DEFAULT_SORT
    assert materialization(result)["sort"] == DEFAULT_SORT


def test_a_sort_change_mid_read_is_read_again_from_the_first_page(
    serve_simulator: ServeSimulator,
    instance: dg.DagsterInstance,
    duckdb_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = serve_simulator(ready_after=30.0)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    defs = build_definitions(store=str(duckdb_file))
    other = ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000)  # someone else
    run = other.start_run("25001", sort="email")
    server.simulator.advance_clock(31)  # ready
    seen = {"rekicked": False, "advanced": False}
    get_page = ActiveCampaignClient._get_page

    def page_meeting_someone_else(
        self: ActiveCampaignClient, segment_id: str, run_id: str, *, sort: str, page: int, page_size: int
    ) -> tuple[MatchAllRun, Any]:
        if self is not other and page == 3 and not seen["rekicked"]:
            # Someone else asks the same run for another sort, and back: the run searches again.
            seen["rekicked"] = True
            other.get_run(segment_id, run_id, sort="-email")
            other.get_run(segment_id, run_id, sort="email")
        answer = get_page(self, segment_id, run_id, sort=sort, page=page, page_size=page_size)
        if self is not other and seen["rekicked"] and not answer[0].is_ready and not seen["advanced"]:
            seen["advanced"] = True  # the asset saw the run not ready mid-read; let the search finish
            server.simulator.advance_clock(31)
        return answer

    monkeypatch.setattr(ActiveCampaignClient, "_get_page", page_meeting_someone_else)
    with other:
        result = materialize_segment(
            defs,
            instance,
            "25001",
            {"run_id": run.run_id, "sort": "email"},
            resources=with_resource(defs, fast_resource(server, page_size=1000, max_concurrent_requests=1)),
        )

    assert seen == {"rekicked": True, "advanced": True}
    assert stored(duckdb_file, "25001") == server.simulator.truth("25001", "email")
    metadata = materialization(result)
    assert metadata["restarts"] == 1
    assert metadata["pages_read"] == 2 + 26  # the two pages read before the change, then all of them
    assert all(evaluation.passed for evaluation in evaluations(result).values())


# -- failed and expired runs ------------------------------------------------------------------


def test_a_failed_run_fails_the_materialization_records_the_check_and_keeps_the_rows(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    set_behavior(server, "77", Behavior.OK)  # the segment worked once ...
    materialize_segment(defs, instance, "77")
    materialize_segment(defs, instance, "1")
    before = stored(duckdb_file, "77")
    assert before == server.simulator.truth("77")

    set_behavior(server, "77", Behavior.FAIL)  # ... then its definition broke
    result = materialize_segment(defs, instance, "77", raise_on_error=False)

    assert not result.success
    assert "failed: it ended at" in failure_message(result)
    assert not result.asset_materializations_for_node("segment_matches")
    evaluation = recorded_evaluation(instance, RUN_NOT_FAILED, "77", result.run_id)
    assert not evaluation.passed
    assert evaluation.severity is dg.AssetCheckSeverity.ERROR
    assert evaluation.description is not None
    assert "will never finish" in evaluation.description
    assert evaluation.partition == "77"
    assert stored(duckdb_file, "77") == before
    assert stored(duckdb_file, "1") == server.simulator.truth("1")


def test_an_expired_run_fails_the_materialization_records_the_check_and_keeps_the_rows(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    materialize_segment(defs, instance, "88")
    before = stored(duckdb_file, "88")
    assert before == server.simulator.truth("88")
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN) as client:
        run = client.start_run("88")
    server.simulator.advance_clock(61)  # runs of segment 88 are gone after 60 s

    result = materialize_segment(defs, instance, "88", {"run_id": run.run_id}, raise_on_error=False)

    assert not result.success
    assert "is gone (404" in failure_message(result)
    evaluation = recorded_evaluation(instance, RUN_NOT_EXPIRED, "88", result.run_id)
    assert not evaluation.passed
    assert evaluation.severity is dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["run_id"].value == run.run_id
    assert stored(duckdb_file, "88") == before


def test_a_run_close_to_its_90_day_limit_warns_but_materializes(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    # The asset measures a run's age against this machine's clock (the only one it has), so the
    # run is started 81 days in the simulator's past and the simulator's clock is set back to now.
    server.simulator.advance_clock(-81 * DAY)
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN) as client:
        run = client.start_run("10001")
    server.simulator.advance_clock(81 * DAY)
    simulated = server.simulator.runs[run.run_id]
    age = server.simulator.now() - simulated.started_at
    assert 81 * DAY <= age < simulated.segment.expire_after  # old, and still readable

    result = materialize_segment(defs, instance, "10001", {"run_id": run.run_id})

    assert result.success
    assert stored(duckdb_file, "10001") == server.simulator.truth("10001")
    expiry = recorded_evaluation(instance, RUN_NOT_EXPIRED, "10001", result.run_id)
    assert not expiry.passed
    assert expiry.severity is dg.AssetCheckSeverity.WARN
    assert expiry.description is not None
    assert "can be re-read only until" in expiry.description
    expires_at = expiry.metadata["run_expires_at"].value
    assert expires_at == pytest.approx(run.run_id_start.timestamp() + 90 * DAY)
    assert recorded_evaluation(instance, RUN_NOT_FAILED, "10001", result.run_id).passed
    assert recorded_evaluation(instance, MATCHES_COMPLETE, "10001", result.run_id).passed


# -- matches_complete on its own --------------------------------------------------------------


def run_matches_complete(
    defs: dg.Definitions, instance: dg.DagsterInstance, segment_id: str
) -> dg.ExecuteInProcessResult:
    """Only the check, on one partition: what "Execute" on the check's partition in the UI runs.

    `dg.materialize(..., selection=checks)` cannot do it in 1.13 (it looks for a partitions
    definition among the selected assets, and there are none); the implicit asset job's subset can.
    """
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(ASSET_KEY, MATCHES_COMPLETE)}
    )
    return job.execute_in_process(
        instance=instance, partition_key=segment_id, resources=defs.resources, raise_on_error=False
    )


TAMPERS = {
    "last-row-lost": (
        "delete from segment_matches where segment_id = '10001' and position = 10001",
        "10000 rows stored where the run holds 10001",
    ),
    "middle-row-lost": (
        "delete from segment_matches where segment_id = '10001' and position = 5",
        "10000 rows stored where the run holds 10001; positions are not exactly 1..n",
    ),
    "duplicate": (
        "update segment_matches set contact_id = (select contact_id from segment_matches "
        "where segment_id = '10001' and position = 1) where segment_id = '10001' and position = 2",
        "1 contact id(s) stored more than once",
    ),
    "positions-shifted": (
        "update segment_matches set position = position + 1 where segment_id = '10001'",
        "positions are not exactly 1..n",
    ),
}


@pytest.mark.parametrize(
    ("engine", "case"),
    [
        *(("duckdb", case) for case in TAMPERS),
        # On PostgreSQL, a lost row and a repeated contact: the summary's counts from its own SQL.
        ("postgresql", "middle-row-lost"),
        ("postgresql", "duplicate"),
    ],
)
def test_matches_complete_fails_when_the_stored_rows_disagree_with_the_run(
    request: pytest.FixtureRequest,
    simulator_env: SimulatorServer,
    instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
    case: str,
) -> None:
    """The summary the check reads is the database's count of the rows as they are now: the rows never
    reach the check's process (the IO manager answers a PartitionSummary input with the engine's `summarize`)."""
    server = simulator_env
    store = (
        f"duckdb://{tmp_path / 'matchall.duckdb'}" if engine == "duckdb" else request.getfixturevalue("postgres_store")
    )
    defs = build_definitions(store=store)
    tamper, problem = TAMPERS[case]
    assert evaluations(materialize_segment(defs, instance, "10001"))[MATCHES_COMPLETE].passed
    materialize_segment(defs, instance, "1")
    execute(store, tamper)
    requests = server.simulator.stats()["requests"]

    def rows_loaded(*args: Any) -> None:
        raise AssertionError("matches_complete loaded the partition's rows")

    monkeypatch.setattr(type(open_store(store)), "read_partition", rows_loaded)

    result = run_matches_complete(defs, instance, "10001")

    # The check is blocking: its failed verdict (ERROR severity) fails its step, and so the run.
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert "blocking asset check failed" in str(failure.event_specific_data)
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.partition == "10001"
    assert evaluation.description is not None
    assert problem.lower() in evaluation.description.lower()  # says what is wrong
    assert not recorded_evaluation(instance, MATCHES_COMPLETE, "10001", result.run_id).passed
    assert not result.asset_materializations_for_node("segment_matches")
    assert server.simulator.stats()["requests"] == requests  # the check reads the store only
    intact = run_matches_complete(defs, instance, "1")
    assert intact.success
    assert intact.get_asset_check_evaluations()[0].passed


# -- the schedule, the sensors and the materializations, end to end ---------------------------


def test_schedule_sensors_and_materializations_end_to_end(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    duckdb_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracked = ["1", "10001", "99"]  # 99 takes an hour to be ready
    names = {segment.id: segment.name for segment in server.simulator.account.segments}
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", ",".join(tracked))
    defs = build_definitions(store=str(duckdb_file))  # MATCHALL_SEGMENTS is read as the definitions are built
    kickoff_job = defs.resolve_job_def("match_all_kickoff_job")

    readiness = defs.resolve_sensor_def("match_all_readiness_sensor")

    def materialize_ready(cursor: str | None) -> tuple[str | None, dict[str, str]]:
        """One readiness tick, then the run of each request executed as the daemon would launch it."""
        with sensor_context(instance, defs, cursor=cursor) as context:
            tick = readiness.evaluate_tick(context)
        read: dict[str, str] = {}
        jobs: dict[str, str] = {}
        for request in tick.run_requests or []:
            assert request.job_name is not None
            result = defs.resolve_job_def(request.job_name).execute_in_process(
                run_config=request.run_config,
                instance=instance,
                partition_key=request.partition_key,
                tags=request.tags,
                resources=defs.resources,
            )
            assert result.success
            for partition, metadata in partition_materializations(result, "segment_matches").items():
                checks = partition_evaluations(result, partition)
                # A batch also records the membership changes and their check; a large segment's
                # changes come from the automation sensor, after this run.
                assert set(checks) == set(CHECKS) | (
                    {PLAUSIBLE} if request.job_name == "read_small_segments" else set()
                )
                assert all(evaluation.passed for evaluation in checks.values())
                assert metadata["segment_name"] == names[partition]  # from the catalog
                read[partition] = metadata["run_id"]
                jobs[partition] = request.job_name
        assert jobs == {segment_id: job for segment_id, job in JOBS.items() if segment_id in read}
        return tick.cursor, read

    # Discovery adds the tracked segments as partitions, asks for their kick-off and for the catalog.
    with sensor_context(instance, defs) as context:
        discovery = defs.resolve_sensor_def("segment_discovery_sensor").evaluate_tick(context)
    (add,) = discovery.dynamic_partitions_requests or []
    assert isinstance(add, dg.AddDynamicPartitionsRequest)
    assert list(add.partition_keys or []) == tracked
    apply_tick(instance, discovery)  # as the daemon does
    by_job = {request.job_name: request for request in discovery.run_requests or []}
    assert set(by_job) == {"match_all_kickoff_job", "activecampaign_segments_job"}
    assert (
        defs.resolve_job_def("activecampaign_segments_job")
        .execute_in_process(
            instance=instance, resources=defs.resources, run_config=by_job["activecampaign_segments_job"].run_config
        )
        .success
    )
    kickoff = by_job["match_all_kickoff_job"]
    assert kickoff.run_config == {"ops": {"start_match_all_runs": {"config": {"segment_ids": tracked}}}}
    assert kickoff_job.execute_in_process(
        instance=instance, resources=defs.resources, run_config=kickoff.run_config
    ).success
    started = {run.segment.id: run.run_id for run in server.simulator.runs.values()}
    assert sorted(started) == sorted(tracked)

    cursor, read = materialize_ready(None)
    assert read == {segment_id: started[segment_id] for segment_id in ("1", "10001")}
    for segment_id in read:
        assert stored(duckdb_file, segment_id) == server.simulator.truth(segment_id)
    assert len(server.simulator.runs) == len(tracked)  # the materializations read the sensor's runs

    # The daily schedule kicks off a fresh run of every tracked segment.
    schedule = defs.resolve_schedule_def("match_all_kickoff_schedule")
    assert schedule.job_name == "match_all_kickoff_job"
    with dg.build_schedule_context(instance=instance) as schedule_context:
        scheduled = schedule.evaluate_tick(schedule_context)
    (daily,) = scheduled.run_requests or []
    assert daily.job_name in (None, "match_all_kickoff_job")
    assert kickoff_job.execute_in_process(
        instance=instance, resources=defs.resources, run_config=daily.run_config
    ).success
    fresh = {run.segment.id: run.run_id for run in server.simulator.runs.values() if run.run_id not in started.values()}
    assert sorted(fresh) == sorted(tracked)

    _, read = materialize_ready(cursor)
    assert read == {segment_id: fresh[segment_id] for segment_id in ("1", "10001")}
    for segment_id in read:
        assert stored(duckdb_file, segment_id) == server.simulator.truth(segment_id)
    assert stored(duckdb_file, "99") == []


# -- the code location ------------------------------------------------------------------------


def test_dagster_definitions_validate_accepts_the_code_location(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(Path(__file__).parents[2] / "dagster.yaml", home / "dagster.yaml")  # the project's instance
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MATCHALL_", "ACTIVECAMPAIGN_"))}
    env.update(
        DAGSTER_HOME=str(home),
        ACTIVECAMPAIGN_API_URL="http://127.0.0.1:9",
        ACTIVECAMPAIGN_API_KEY=DEFAULT_TOKEN,
        MATCHALL_STORE=f"duckdb://{tmp_path / 'matchall.duckdb'}",
    )
    dagster = Path(sys.executable).parent / "dagster"
    completed = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "matchall_dagster.definitions"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "All code locations passed validation" in completed.stdout + completed.stderr
    assert not (tmp_path / "matchall.duckdb").exists()  # loading the definitions touches no data

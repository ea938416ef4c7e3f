"""The discovery and readiness sensors, through `build_sensor_context` and `evaluate_tick`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignClient, RunState, RunStatus
from matchall_dagster.checks import RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.kickoff import pending_observation
from matchall_dagster.models import MatchAllRun
from matchall_dagster.sensors import (
    MAX_POLLS_PER_TICK,
    PendingRun,
    ReadinessCursor,
    Step,
    decide,
    poll_delay,
)
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimAccount, SimSegment, SimulatorServer
from matchall_dagster_tests.conftest import UUID_SEGMENT, ServeSimulator, sensor_context

READINESS = "match_all_readiness_sensor"
DISCOVERY = "segment_discovery_sensor"


def tick(
    instance: dg.DagsterInstance, defs: dg.Definitions, name: str, cursor: str | None = None
) -> dg.SensorExecutionData:
    with sensor_context(instance, defs, cursor) as context:
        return defs.resolve_sensor_def(name).evaluate_tick(context)


def record_pending(
    instance: dg.DagsterInstance, server: SimulatorServer, *segment_ids: str, sort: str = "id"
) -> dict[str, str]:
    """Start runs as the kick-off does and record them as pending; returns run ids by segment."""
    instance.add_dynamic_partitions("segments", list(segment_ids))
    runs = {}
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        for segment_id in segment_ids:
            run = client.start_run(segment_id, sort=sort)
            instance.report_runless_asset_event(pending_observation(segment_id, run, sort))
            runs[segment_id] = run.run_id
    return runs


def checks_of(data: dg.SensorExecutionData) -> list[tuple[str, str | None, str]]:
    """The check-only runs requested: (check, partition, remote run id judged)."""
    found = []
    for request in data.run_requests:
        if request.asset_check_keys:
            (key,) = request.asset_check_keys
            config = request.run_config["ops"][f"segment_matches_{key.name}"]["config"]
            assert request.asset_selection == []
            found.append((key.name, request.partition_key, config["run_id"]))
    return found


def materializations_of(data: dg.SensorExecutionData) -> list[str | None]:
    return [request.partition_key for request in data.run_requests if not request.asset_check_keys]


# -- the pure decision ---------------------------------------------------------------------------


def pending(**changes: object) -> PendingRun:
    run = PendingRun(segment_id="7", run_id="r", sort="id", next_poll_at=0.0)
    return run.model_copy(update=changes)


def status(state: RunState) -> RunStatus:
    run = MatchAllRun(
        run_id="r",
        run_id_start=datetime(2026, 1, 1, tzinfo=UTC),
        run_id_end=None if state is RunState.RUNNING else datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        is_ready=state is RunState.READY,
        segment_id="7",
    )
    return RunStatus(state=state, run=None if state is RunState.EXPIRED else run)


@pytest.mark.parametrize(
    ("state", "attempt", "step"),
    [
        (RunState.READY, 1, Step.MATERIALIZE),
        (RunState.EXPIRED, 1, Step.EXPIRED),
        (RunState.FAILED, 1, Step.RESTART),
        (RunState.FAILED, 3, Step.GIVE_UP),
        (RunState.RUNNING, 1, Step.WAIT),
    ],
)
def test_decide(state: RunState, attempt: int, step: Step) -> None:
    assert decide(pending(attempt=attempt), status(state), now=100.0, max_attempts=3).step is step


def test_polls_back_off_per_run() -> None:
    run = pending()
    delays = []
    for _ in range(10):
        run = decide(run, status(RunState.RUNNING), now=0.0).run
        delays.append(run.next_poll_at)
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0]
    assert delays[-1] == poll_delay(10) == 600.0


def test_an_unreadable_cursor_resets_cleanly() -> None:
    import logging

    assert ReadinessCursor.load("{not json", logging.getLogger("test")) == ReadinessCursor()
    assert ReadinessCursor.load(None, logging.getLogger("test")).pending == []


# -- discovery -----------------------------------------------------------------------------------


def test_discovery_adds_segments_as_partitions_and_starts_their_runs(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    data = tick(instance, defs, DISCOVERY)
    (request,) = data.dynamic_partitions_requests
    assert isinstance(request, dg.AddDynamicPartitionsRequest)
    expected = [segment.id for segment in server.simulator.account.segments]
    assert list(request.partition_keys) == expected
    (run,) = data.run_requests
    assert run.run_config["ops"]["start_match_all_runs"]["config"]["segment_ids"] == expected
    instance.add_dynamic_partitions("segments", expected)
    again = tick(instance, defs, DISCOVERY)
    assert not again.run_requests
    assert again.skip_message is not None
    assert "No new segments" in again.skip_message


def test_discovery_honours_the_allow_list(
    instance: dg.DagsterInstance, defs: dg.Definitions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATCHALL_SEGMENTS", "10001, 1,not-there")
    (request,) = tick(instance, defs, DISCOVERY).dynamic_partitions_requests
    assert list(request.partition_keys) == ["1", "10001"]


def test_discovery_skips_when_the_api_refuses(
    instance: dg.DagsterInstance, defs: dg.Definitions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", "wrong-key-123")
    data = tick(instance, defs, DISCOVERY)
    assert data.skip_message is not None
    assert "refused the API token" in data.skip_message
    assert "wrong-key-123" not in data.skip_message


# -- readiness -----------------------------------------------------------------------------------


def test_ready_runs_are_requested_once_each(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    runs = record_pending(instance, server, "1", "10001", sort="-email")
    data = tick(instance, defs, READINESS)
    requested = {request.partition_key: request for request in data.run_requests}
    assert set(requested) == {"1", "10001"}
    for segment_id, request in requested.items():
        assert request.run_key == f"{segment_id}/{runs[segment_id]}"
        config = request.run_config["ops"]["segment_matches"]["config"]
        assert config == {"run_id": runs[segment_id], "sort": "-email"}
    assert json.loads(data.cursor or "{}").get("pending", []) == []
    later = tick(instance, defs, READINESS, data.cursor)
    assert not later.run_requests  # nothing is requested twice


def test_running_runs_wait_with_backoff_and_stay_in_the_cursor(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "99")
    data = tick(instance, defs, READINESS)
    assert not data.run_requests
    (run,) = ReadinessCursor.model_validate_json(data.cursor or "").pending
    assert (run.segment_id, run.polls) == ("99", 1)
    assert run.next_poll_at > time.time() + 5
    again = tick(instance, defs, READINESS, data.cursor)  # not due yet: no poll
    assert ReadinessCursor.model_validate_json(again.cursor or "").pending[0].polls == 1
    server.simulator.advance_clock(3_601)
    ready_cursor = ReadinessCursor.model_validate_json(again.cursor or "")
    ready_cursor.pending[0].next_poll_at = 0
    done = tick(instance, defs, READINESS, ready_cursor.model_dump_json())
    assert [request.partition_key for request in done.run_requests] == ["99"]


def test_a_failed_run_is_recorded_on_its_partition_and_started_again(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    runs = record_pending(instance, server, "77", "1")
    data = tick(instance, defs, READINESS)
    assert checks_of(data) == [(RUN_NOT_FAILED, "77", runs["77"])]
    observations = [e for e in data.asset_events if isinstance(e, dg.AssetObservation)]
    assert [o.partition for o in observations] == ["77"]
    (fresh,) = ReadinessCursor.model_validate_json(data.cursor or "").pending
    assert fresh.segment_id == "77"
    assert fresh.run_id != runs["77"]
    assert fresh.attempt == 2
    assert materializations_of(data) == ["1"]


def test_failed_runs_are_started_again_at_most_max_attempts_times(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "77")
    cursor = None
    outcomes = []
    for _ in range(4):
        data = tick(instance, defs, READINESS, cursor)
        outcomes.append(checks_of(data))
        state = ReadinessCursor.model_validate_json(data.cursor or "")
        for run in state.pending:
            run.next_poll_at = 0
        cursor = state.model_dump_json()
    assert [len(found) for found in outcomes] == [1, 1, 1, 0]
    assert ReadinessCursor.model_validate_json(cursor or "").pending == []
    assert server.simulator.stats()["requests"] == 3 + 3  # 3 starts, 3 polls


def test_the_number_of_attempts_is_configurable_and_validated(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_pending(instance, server, "77")
    monkeypatch.setenv("MATCHALL_MAX_RUN_ATTEMPTS", "1")
    data = tick(instance, defs, READINESS)
    assert [check for check, *_ in checks_of(data)] == [RUN_NOT_FAILED]
    assert ReadinessCursor.model_validate_json(data.cursor or "").pending == []  # no fresh run
    monkeypatch.setenv("MATCHALL_MAX_RUN_ATTEMPTS", "many")
    with pytest.raises(Exception, match="MATCHALL_MAX_RUN_ATTEMPTS must be a whole number from 1 to 100"):
        tick(instance, defs, READINESS)


def test_an_expired_run_is_recorded_as_run_not_expired(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    runs = record_pending(instance, server, "88")
    server.simulator.advance_clock(61)
    data = tick(instance, defs, READINESS)
    assert checks_of(data) == [(RUN_NOT_EXPIRED, "88", runs["88"])]
    assert materializations_of(data) == []
    assert ReadinessCursor.model_validate_json(data.cursor or "").pending == []


def test_one_bad_segment_does_not_stop_the_others(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "1", "10001")
    server.simulator.set_faults(Faults(error_rate=1.0))
    failing = tick(instance, defs, READINESS)  # every poll gives up after its retries
    assert not failing.run_requests
    state = ReadinessCursor.model_validate_json(failing.cursor or "")
    assert sorted(run.segment_id for run in state.pending) == ["1", "10001"]
    server.simulator.set_faults(Faults())
    for run in state.pending:
        run.next_poll_at = 0
    recovered = tick(instance, defs, READINESS, state.model_dump_json())
    assert sorted(request.partition_key for request in recovered.run_requests) == ["1", "10001"]


def test_a_tick_polls_a_bounded_batch_oldest_due_first(
    instance: dg.DagsterInstance, serve_simulator: ServeSimulator, monkeypatch: pytest.MonkeyPatch, duckdb_file: object
) -> None:
    from matchall_dagster.definitions import build_definitions

    count = MAX_POLLS_PER_TICK * 3 // 2  # more than one tick polls, fewer than two
    many = SimAccount([SimSegment(str(i), f"S{i}", 3, ready_after=10**6) for i in range(1, count + 1)])
    server = serve_simulator(many)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    monkeypatch.setattr("matchall_dagster.sensors.SENSOR_REQUESTS_PER_SECOND", 1000.0)
    defs = build_definitions(duckdb_database=str(duckdb_file))
    record_pending(instance, server, *[segment.id for segment in many.segments])
    server.simulator.reset_stats()
    first = tick(instance, defs, READINESS)
    assert server.simulator.stats()["requests"] == MAX_POLLS_PER_TICK
    state = ReadinessCursor.model_validate_json(first.cursor or "")
    polled = {run.segment_id for run in state.pending if run.polls}
    assert len(polled) == MAX_POLLS_PER_TICK
    waiting_since = max(run.next_poll_at for run in state.pending if not run.polls)
    for run in state.pending:  # the polled ones are due again too, but became due later
        if run.polls:
            run.next_poll_at = waiting_since + 0.001
    second = tick(instance, defs, READINESS, state.model_dump_json())
    after = ReadinessCursor.model_validate_json(second.cursor or "")
    assert all(run.polls >= 1 for run in after.pending)  # no run waited more than two ticks


def test_the_cursor_stays_small(instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer) -> None:
    record_pending(instance, server, "99")
    data = tick(instance, defs, READINESS)
    assert len(data.cursor or "") < 300


def test_the_requested_check_runs_record_the_verdict_on_the_partition(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "77", "88")
    server.simulator.advance_clock(61)
    data = tick(instance, defs, READINESS)
    job = defs.resolve_implicit_global_asset_job_def()
    for request in data.run_requests:
        if not request.asset_check_keys:
            continue
        subset = job.get_subset(asset_selection=set(), asset_check_selection=set(request.asset_check_keys))
        result = subset.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            resources=defs.resources,
        )
        (evaluation,) = result.get_asset_check_evaluations()
        assert (evaluation.partition, evaluation.passed) == (request.partition_key, False)
        assert evaluation.severity is dg.AssetCheckSeverity.ERROR
        assert evaluation.metadata["run_id"].value == request.tags["matchall/run_id"]
    failed = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("segment_matches"), RUN_NOT_FAILED), limit=5
    )
    assert [(record.partition, record.status.value) for record in failed] == [("77", "FAILED")]
    expired = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("segment_matches"), RUN_NOT_EXPIRED), limit=5
    )
    assert [(record.partition, record.status.value) for record in expired] == [("88", "FAILED")]


class _Killed(BaseException):
    """Stands for the evaluation being killed (time-out, crash): nothing after it runs."""


def test_killed_ticks_forget_no_run_and_materialize_none_twice(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    server: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ticks are killed at random points; as in the daemon, a killed tick's cursor is not saved."""
    import random

    monkeypatch.setattr("matchall_dagster.sensors.SENSOR_REQUESTS_PER_SECOND", 1000.0)
    segments = ["1", "9999", "10000", "10001", "25001", UUID_SEGMENT, "100", "77"]
    record_pending(instance, server, *segments)
    rng = random.Random(5)
    real_poll = ActiveCampaignClient.poll_run
    real_start = ActiveCampaignClient.start_run
    real_fetch = dg.DagsterInstance.fetch_observations

    def maybe_kill() -> None:
        if rng.random() < 0.15:
            raise _Killed

    def poll(self: ActiveCampaignClient, *args: Any, **kwargs: Any) -> RunStatus:
        maybe_kill()
        status = real_poll(self, *args, **kwargs)
        maybe_kill()
        return status

    def start(self: ActiveCampaignClient, *args: Any, **kwargs: Any) -> MatchAllRun:
        maybe_kill()
        return real_start(self, *args, **kwargs)

    def fetch(self: dg.DagsterInstance, *args: Any, **kwargs: Any) -> Any:
        maybe_kill()
        return real_fetch(self, *args, **kwargs)

    monkeypatch.setattr(ActiveCampaignClient, "poll_run", poll)
    monkeypatch.setattr(ActiveCampaignClient, "start_run", start)
    monkeypatch.setattr(dg.DagsterInstance, "fetch_observations", fetch)

    cursor: str | None = None
    requested: list[str] = []
    killed = 0
    for _ in range(80):
        try:
            data = tick(instance, defs, READINESS, cursor)
        except _Killed:
            killed += 1
            continue
        requested.extend(request.run_key or "" for request in data.run_requests)
        for event in data.asset_events:  # the daemon stores a successful tick's events
            instance.report_runless_asset_event(event)
        state = ReadinessCursor.model_validate_json(data.cursor or "")
        for run in state.pending:  # make everything due at once instead of waiting
            run.next_poll_at = 0
        cursor = state.model_dump_json()
        if not state.pending:
            break
    assert killed > 0
    assert ReadinessCursor.model_validate_json(cursor or "").pending == []  # nothing forgotten, nothing left
    assert len(requested) == len(set(requested))  # nothing requested twice
    materialized = sorted(key.split("/")[0] for key in requested if key.count("/") == 1)
    assert materialized == sorted(s for s in segments if s != "77")
    failed_checks = [key for key in requested if key.startswith("77/")]
    assert len(failed_checks) == 3  # one run_not_failed check per failed attempt

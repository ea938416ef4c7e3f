"""The readiness sensor through `build_sensor_context` and `evaluate_tick`: polls, steps, the budget,
faults and kills. Its policy and cursor are tested alone in `matchall_dagster_tests/lifecycle`."""

from __future__ import annotations

import random
import time
from typing import Any

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignClient, RunStatus
from matchall_dagster.api.errors import APIUnavailableError
from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.lifecycle.policy import FIRST_POLL_DELAY, MAX_POLL_DELAY, REQUESTS_PER_TICK, TICK_DEADLINE_SECONDS
from matchall_dagster.orchestration.names import RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.settings import ConfigurationError
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimAccount, SimSegment, SimulatorServer
from matchall_dagster_tests.conftest import UUID_SEGMENT, ServeSimulator, set_setting
from matchall_dagster_tests.orchestration.sensor_ticks import (
    LOG,
    READINESS,
    Clock,
    cursor_of,
    reads_of,
    record_pending,
    tick,
)

pytestmark = pytest.mark.usefixtures("sensor_clock")


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


def materializations_of(data: dg.SensorExecutionData) -> list[str]:
    return [read.segment_id for read in reads_of(data)]


def test_ready_runs_are_requested_once_each(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    runs = record_pending(instance, server, "1", "10001", sort="-email")
    data = tick(instance, defs, READINESS)
    requested = {read.segment_id: read for read in reads_of(data)}
    assert set(requested) == {"1", "10001"}
    for segment_id, read in requested.items():
        assert (read.run_id, read.sort, read.polls) == (runs[segment_id], "-email", 1)
    assert not requested["10001"].batch  # more than a page: a run of its own
    assert requested["1"].batch  # one page: in a batch of the small ones
    assert cursor_of(data).waiting == {}
    later = tick(instance, defs, READINESS, data.cursor)
    assert not later.run_requests  # nothing is requested twice
    assert server.simulator.stats()["requests"] == 2 + 2  # two starts, two polls, nothing after


def test_runs_of_segments_marked_deleted_or_forgotten_are_dropped_without_a_request(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "1", "10001", "25001")
    instance.add_dynamic_partitions("deleted_segments", ["1"])
    instance.delete_dynamic_partition("segments", "10001")  # `matchall forget 10001`
    server.simulator.reset_stats()
    data = tick(instance, defs, READINESS)
    assert materializations_of(data) == ["25001"]
    assert server.simulator.stats()["requests"] == 1
    assert cursor_of(data).waiting == {}
    again = tick(instance, defs, READINESS, data.cursor)
    assert not again.run_requests
    assert server.simulator.stats()["requests"] == 1  # never polled again


def test_running_runs_wait_with_backoff_in_the_cursor(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, sensor_clock: Clock
) -> None:
    record_pending(instance, server, "99")  # ready after an hour
    data = tick(instance, defs, READINESS)
    assert not data.run_requests
    ((next_poll_at, polls),) = cursor_of(data).waiting.values()
    assert polls == 1
    assert next_poll_at >= time.time() + FIRST_POLL_DELAY - 1
    again = tick(instance, defs, READINESS, data.cursor)  # not due yet: no poll
    assert cursor_of(again) == cursor_of(data)
    assert len(data.cursor or "") < 120
    server.simulator.advance_clock(3_601)
    sensor_clock.advance(3_601)
    done = tick(instance, defs, READINESS, again.cursor)
    assert [(read.segment_id, read.polls) for read in reads_of(done)] == [("99", 2)]
    assert cursor_of(done).waiting == {}


def test_a_newer_run_of_a_segment_replaces_the_older_one(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, sensor_clock: Clock
) -> None:
    older = record_pending(instance, server, "99")
    first = tick(instance, defs, READINESS)
    assert len(cursor_of(first).waiting) == 1  # the older run, polled, waits
    newer = record_pending(instance, server, "99")  # the next day's kick-off, say
    server.simulator.advance_clock(3_601)  # both are ready now
    sensor_clock.advance(3_601)
    server.simulator.reset_stats()
    data = tick(instance, defs, READINESS, first.cursor)
    assert [(read.segment_id, read.run_id) for read in reads_of(data)] == [("99", newer["99"])]
    assert older["99"] != newer["99"]
    assert server.simulator.stats()["requests"] == 1  # the older one is dropped without a poll
    assert cursor_of(data).waiting == {}


def test_a_long_history_of_replaced_runs_costs_no_request(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    """As after a lost cursor: every record is read again, only the newest of a segment is polled."""
    for _ in range(REQUESTS_PER_TICK * 3):  # more old records than a tick's budget
        record_pending(instance, server, "99")
    latest = record_pending(instance, server, "99", "1")
    server.simulator.reset_stats()
    data = tick(instance, defs, READINESS)
    assert server.simulator.stats()["requests"] == 2
    assert [(read.segment_id, read.run_id) for read in reads_of(data)] == [("1", latest["1"])]
    (waiting,) = cursor_of(data).waiting  # the newest run of 99
    after = cursor_of(data).after
    assert after is not None
    assert after >= waiting
    again = tick(instance, defs, READINESS, data.cursor)
    assert not again.run_requests
    assert server.simulator.stats()["requests"] == 2


def test_a_failed_run_is_recorded_on_its_partition_and_started_again(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, sensor_clock: Clock
) -> None:
    runs = record_pending(instance, server, "77", "1", names={"77": "Fails"})
    data = tick(instance, defs, READINESS)
    assert checks_of(data) == [(RUN_NOT_FAILED, "77", runs["77"])]
    assert materializations_of(data) == ["1"]
    (observation,) = [e for e in data.asset_events if isinstance(e, dg.AssetObservation)]
    assert observation.partition == "77"
    assert observation.metadata["matchall/attempt"].value == 2
    assert observation.metadata["matchall/segment_name"].value == "Fails"  # the fresh run keeps the name
    assert observation.metadata["matchall/run_id"].value != runs["77"]
    assert cursor_of(data).waiting == {}  # the fresh run comes back through its record
    for event in data.asset_events:  # as the daemon does
        instance.report_runless_asset_event(event)
    sensor_clock.advance(FIRST_POLL_DELAY)
    again = tick(instance, defs, READINESS, data.cursor)
    assert checks_of(again) == [(RUN_NOT_FAILED, "77", observation.metadata["matchall/run_id"].value)]


def test_a_fresh_run_that_cannot_be_started_is_tried_again_later(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    server: SimulatorServer,
    sensor_clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record_pending(instance, server, "77")
    real_start = ActiveCampaignClient.start_run

    def unavailable(self: ActiveCampaignClient, *args: Any, **kwargs: Any) -> MatchAllRun:
        raise APIUnavailableError("the API answered 503 (injected at the start of the fresh run)")

    monkeypatch.setattr(ActiveCampaignClient, "start_run", unavailable)
    data = tick(instance, defs, READINESS)
    assert [check for check, *_ in checks_of(data)] == [RUN_NOT_FAILED]
    assert not data.asset_events
    assert len(cursor_of(data).waiting) == 1  # the failed run stays, to be polled and restarted
    monkeypatch.setattr(ActiveCampaignClient, "start_run", real_start)
    sensor_clock.advance(2 * FIRST_POLL_DELAY)
    again = tick(instance, defs, READINESS, data.cursor)
    (observation,) = again.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert observation.metadata["matchall/attempt"].value == 2


def test_failed_runs_are_started_again_at_most_max_attempts_times(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, sensor_clock: Clock
) -> None:
    record_pending(instance, server, "77")
    cursor = None
    outcomes = []
    for _ in range(4):
        data = tick(instance, defs, READINESS, cursor)
        outcomes.append(checks_of(data))
        for event in data.asset_events:
            instance.report_runless_asset_event(event)
        cursor = data.cursor
        sensor_clock.advance(FIRST_POLL_DELAY)
    assert [len(found) for found in outcomes] == [1, 1, 1, 0]
    assert ReadinessCursor.load(cursor, LOG).waiting == {}
    assert server.simulator.stats()["requests"] == 3 + 3  # 3 starts, 3 polls


def test_the_number_of_attempts_is_configurable_and_validated(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_pending(instance, server, "77")
    set_setting(monkeypatch, "MATCHALL_MAX_RUN_ATTEMPTS", "1")
    data = tick(instance, defs, READINESS)
    assert [check for check, *_ in checks_of(data)] == [RUN_NOT_FAILED]
    assert not data.asset_events  # no fresh run
    set_setting(monkeypatch, "MATCHALL_MAX_RUN_ATTEMPTS", "many")
    with pytest.raises(ConfigurationError, match="MATCHALL_MAX_RUN_ATTEMPTS: Input should be a valid integer"):
        tick(instance, defs, READINESS)


def test_an_expired_run_is_recorded_as_run_not_expired(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    runs = record_pending(instance, server, "88")
    server.simulator.advance_clock(61)
    data = tick(instance, defs, READINESS)
    assert checks_of(data) == [(RUN_NOT_EXPIRED, "88", runs["88"])]
    assert materializations_of(data) == []
    assert cursor_of(data).waiting == {}


def test_one_bad_segment_does_not_stop_the_others(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, sensor_clock: Clock
) -> None:
    record_pending(instance, server, "1", "10001")
    server.simulator.set_faults(Faults(error_rate=1.0))
    failing = tick(instance, defs, READINESS)  # each poll fails (no retry inside a tick)
    assert not failing.run_requests
    assert len(cursor_of(failing).waiting) == 2
    server.simulator.set_faults(Faults())
    sensor_clock.advance(2 * FIRST_POLL_DELAY)  # due again: the wait is the run's age, in whole seconds
    recovered = tick(instance, defs, READINESS, failing.cursor)
    assert sorted(materializations_of(recovered)) == ["1", "10001"]


def test_an_unavailable_api_ends_the_tick_early_and_keeps_the_rest_due(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    segments = ["1", "9999", "10000", "10001", "25001"]
    record_pending(instance, server, *segments)
    server.simulator.set_faults(Faults(error_rate=1.0))
    server.simulator.reset_stats()
    data = tick(instance, defs, READINESS)
    assert server.simulator.stats()["requests"] == 3  # three in a row unavailable: stop
    assert data.skip_message is not None
    assert "unavailable" in data.skip_message
    assert len(cursor_of(data).waiting) == 3  # the other two are still new records, due first


def test_a_long_retry_after_ends_the_tick_instead_of_waiting(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "1", "10001")
    server.simulator.set_faults(
        Faults(burst_429_rate=1.0, burst_429_length=100, burst_429_retry_after_seconds=int(TICK_DEADLINE_SECONDS))
    )
    began = time.monotonic()
    data = tick(instance, defs, READINESS)
    assert time.monotonic() - began < 10
    assert data.skip_message is not None
    assert "wait past the tick" in data.skip_message


@pytest.mark.usefixtures("fast_budget")
def test_a_tick_sends_at_most_its_budget_oldest_due_first(
    instance: dg.DagsterInstance,
    serve_simulator: ServeSimulator,
    monkeypatch: pytest.MonkeyPatch,
    duckdb_file: object,
    sensor_clock: Clock,
) -> None:
    from matchall_dagster.definitions import build_definitions

    count = REQUESTS_PER_TICK * 3 // 2  # more than one tick polls, fewer than two
    many = SimAccount([SimSegment(str(i), f"S{i}", 3, ready_after=10**6) for i in range(1, count + 1)])
    server = serve_simulator(many)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    defs = build_definitions(store=str(duckdb_file))
    record_pending(instance, server, *[segment.id for segment in many.segments])
    server.simulator.reset_stats()
    first = tick(instance, defs, READINESS)
    assert server.simulator.stats()["requests"] == REQUESTS_PER_TICK
    state = cursor_of(first)
    assert len(state.waiting) == REQUESTS_PER_TICK
    sensor_clock.advance(3_600)  # everything is due: the polled runs again, the others for the first time
    server.simulator.reset_stats()
    second = tick(instance, defs, READINESS, first.cursor)
    assert server.simulator.stats()["requests"] == REQUESTS_PER_TICK
    after = cursor_of(second)
    assert len(after.waiting) == count  # every run now polled once at least: none waited two ticks
    repolled = [storage_id for storage_id, (_, polls) in after.waiting.items() if polls == 2]
    assert len(repolled) == REQUESTS_PER_TICK - (count - REQUESTS_PER_TICK)
    by_due = sorted(state.waiting, key=lambda storage_id: (state.waiting[storage_id][0], storage_id))
    assert sorted(repolled) == sorted(by_due[: len(repolled)])  # the oldest due of those


def test_the_requested_check_runs_record_the_verdict_on_the_partition(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    record_pending(instance, server, "77", "88")
    server.simulator.advance_clock(61)
    data = tick(instance, defs, READINESS)
    for request in data.run_requests:
        if not request.asset_check_keys:
            continue
        assert request.job_name == "segment_matches_job"
        job = defs.resolve_job_def(request.job_name)
        subset = job.get_subset(asset_selection=set(), asset_check_selection=set(request.asset_check_keys))
        result = subset.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            resources=defs.resources,
            raise_on_error=False,
        )
        # The checks are blocking: the failed verdict (ERROR severity) fails the check's run too.
        assert not result.success
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


@pytest.mark.usefixtures("fast_budget")
def test_killed_ticks_forget_no_run_and_materialize_none_twice(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    server: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    sensor_clock: Clock,
) -> None:
    """Ticks are killed at random points; as in the daemon, a killed tick's cursor is not saved."""
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
        sensor_clock.advance(MAX_POLL_DELAY)  # everything due again at once instead of waiting
        try:
            data = tick(instance, defs, READINESS, cursor)
        except _Killed:
            killed += 1
            continue
        requested.extend(f"{read.segment_id}/{read.run_id}" for read in reads_of(data))
        requested.extend(request.run_key or "" for request in data.run_requests if request.asset_check_keys)
        for event in data.asset_events:  # the daemon stores a successful tick's events
            instance.report_runless_asset_event(event)
        cursor = data.cursor
        if not ReadinessCursor.load(cursor, LOG).waiting and len(requested) >= len(segments) + 2:
            break
    assert killed > 0
    assert ReadinessCursor.load(cursor, LOG).waiting == {}  # nothing forgotten, nothing left
    assert len(requested) == len(set(requested))  # nothing requested twice
    materialized = sorted(key.split("/")[0] for key in requested if key.count("/") == 1)
    assert materialized == sorted(s for s in segments if s != "77")
    failed_checks = [key for key in requested if key.startswith("77/")]
    assert len(failed_checks) == 3  # one run_not_failed check per failed attempt

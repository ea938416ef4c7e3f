"""The discovery and readiness sensors, through `build_sensor_context` and `evaluate_tick`; the
readiness sensor's pure parts (`decide`, `plan`, the cursor) directly, and under load in a
simulated-time driver."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import httpx
import pytest

from matchall_dagster import ActiveCampaignClient, RunState, RunStatus
from matchall_dagster.api.errors import APIUnavailableError
from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.lifecycle.discovery import COUNTS_REFRESH_SECONDS, DiscoveryCursor, reconcile
from matchall_dagster.orchestration.checks import ASSET_KEY, RUN_NOT_EXPIRED, RUN_NOT_FAILED, STATUS
from matchall_dagster.orchestration.kickoff import pending_observation
from matchall_dagster.orchestration.sensors import (
    FIRST_POLL_DELAY,
    MAX_POLL_DELAY,
    REQUESTS_PER_TICK,
    TICK_DEADLINE_SECONDS,
    Due,
    PendingRun,
    ReadinessCursor,
    Step,
    backed_off,
    decide,
    plan,
    poll_delay,
)
from matchall_dagster.settings import ConfigurationError
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimAccount, SimSegment, SimulatorServer
from matchall_dagster_tests.conftest import (
    UUID_SEGMENT,
    ServeSimulator,
    apply_tick,
    materialize_segment,
    sensor_context,
    set_setting,
)

READINESS = "match_all_readiness_sensor"
DISCOVERY = "segment_discovery_sensor"
LOG = logging.getLogger("test")


def tick(
    instance: dg.DagsterInstance, defs: dg.Definitions, name: str, cursor: str | None = None
) -> dg.SensorExecutionData:
    with sensor_context(instance, defs, cursor) as context:
        return defs.resolve_sensor_def(name).evaluate_tick(context)


class Clock:
    """The readiness sensor's wall clock, moved forward by the test instead of waiting. It starts
    FIRST_POLL_DELAY ahead, so that runs recorded by a test are due at once."""

    def __init__(self) -> None:
        self.offset = FIRST_POLL_DELAY

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(autouse=True)
def sensor_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("matchall_dagster.orchestration.sensors.clock", clock)
    return clock


def record_pending(
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    *segment_ids: str,
    sort: str = "id",
    names: dict[str, str] | None = None,
) -> dict[str, str]:
    """Start runs as the kick-off does and record them as pending; returns run ids by segment."""
    instance.add_dynamic_partitions(
        "segments", sorted(set(segment_ids) - set(instance.get_dynamic_partitions("segments")))
    )
    runs = {}
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        for segment_id in segment_ids:
            run = client.start_run(segment_id, sort=sort)
            name = (names or {}).get(segment_id)
            instance.report_runless_asset_event(pending_observation(segment_id, run, sort, name=name))
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


def stored_rows(duckdb_file: Path, segment_id: str) -> int:
    connection = duckdb.connect(str(duckdb_file), read_only=True)
    try:
        ((count,),) = connection.execute(
            "select count(*) from main.segment_matches where segment_id = ?", [segment_id]
        ).fetchall()
    finally:
        connection.close()
    return int(count)


def cursor_of(data: dg.SensorExecutionData) -> ReadinessCursor:
    return ReadinessCursor.load(data.cursor, LOG)


# -- the pure parts ------------------------------------------------------------------------------


def pending(**changes: Any) -> PendingRun:
    return PendingRun(segment_id="7", run_id="r", sort="id", started_at=0.0, **changes)


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


def test_polls_back_off_with_the_run_s_age() -> None:
    run = pending(next_poll_at=FIRST_POLL_DELAY)
    polled_at = []
    while run.next_poll_at < 3_600:
        polled_at.append(run.next_poll_at)
        run = decide(run, status(RunState.RUNNING), now=run.next_poll_at).run
    assert polled_at[:6] == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0]  # soon after the start, then less often
    assert run.polls == len(polled_at) == 12  # an hour-long run costs a dozen polls
    assert poll_delay(10**6) == MAX_POLL_DELAY
    late = backed_off(pending(), now=3_000.0)  # first polled late: not again seconds later
    assert late.next_poll_at == 3_000.0 + MAX_POLL_DELAY


def due(at: float, storage_id: int, fresh: bool = False) -> Due:
    return Due(at, storage_id, fresh)


def test_plan_polls_the_oldest_due_first_within_the_budget() -> None:
    waiting = [due(50, 1), due(10, 2), due(500, 3), due(30, 4)]
    fresh = [due(20, 10, True), due(40, 11, True), due(45, 12, True), due(200, 13, True)]
    chosen = plan(waiting, fresh, now=100, budget=4)
    assert [item.storage_id for item in chosen] == [2, 10, 4, 11]
    everything = plan(waiting, fresh, now=100, budget=100)
    assert [item.storage_id for item in everything] == [2, 10, 4, 11, 12, 1]  # 3 and 13 are not due


def test_plan_takes_new_records_in_log_order() -> None:
    # A record written late but due early does not jump the ones before it: the taken ones stay a
    # prefix of the log, so the cursor needs only the last one taken.
    fresh = [due(30, 10, True), due(10, 11, True), due(35, 12, True)]
    chosen = plan([due(31, 1)], fresh, now=100, budget=2)
    assert [item.storage_id for item in chosen] == [10, 11]
    assert [item.storage_id for item in plan([], fresh, now=32, budget=10)] == [10, 11]


def test_the_cursor_packs_10000_waiting_runs_in_a_few_bytes_each() -> None:
    rng = random.Random(1)
    now = 1_800_000_000.0
    waiting = {
        storage_id: (now + rng.uniform(0, MAX_POLL_DELAY), rng.randint(1, 14))
        for storage_id in sorted(rng.sample(range(1, 40_000), 10_000))
    }
    cursor = ReadinessCursor(after=40_000, waiting=waiting)
    raw = cursor.dump()
    assert len(raw) < 10_000 * 6  # under 6 bytes a run, the JSON list of runs took about 130
    back = ReadinessCursor.load(raw, LOG)
    assert back.after == 40_000
    assert back.waiting.keys() == waiting.keys()
    for storage_id, (next_poll_at, polls) in waiting.items():
        assert back.waiting[storage_id] == (math.ceil(next_poll_at), polls)  # due times in whole seconds
    assert ReadinessCursor.load(ReadinessCursor().dump(), LOG) == ReadinessCursor()


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        '{"observations": "x", "pending": [{"segment_id": "1"}]}',  # the previous version's cursor
        '{"v": 2, "after": 5, "n": 3, "base": 0, "waiting": "AAAA"}',
        '{"v": 2, "after": "five"}',
    ],
)
def test_an_unreadable_cursor_resets_cleanly(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    assert ReadinessCursor.load(raw, LOG) == ReadinessCursor()
    assert "could not be read" in caplog.text
    assert ReadinessCursor.load(None, LOG) == ReadinessCursor()


def simulate(
    runs: int, ready_after: list[float], *, kickoff_rate: float, tick_seconds: float, budget: int
) -> dict[str, float]:
    """The sensor's scheduling (plan, decide, the cursor's round trip) against runs that start at
    the kick-off's rate and turn ready after the given delays, in simulated time.

    Returns the most ticks a due run waited for its poll, how far beyond its turn that is (its turn:
    floor(runs due before it, when it became due / budget) ticks), the polls per run, and the
    worst delay from ready to requested.
    """
    started = [i / kickoff_rate for i in range(runs)]
    cursor = ReadinessCursor()
    polls = [0] * runs
    first_seen: dict[tuple[int, float], tuple[int, int]] = {}  # (run, due) -> (tick, rank then)
    worst_wait_ticks = worst_excess = worst_delay = 0.0
    done = 0
    ticks = 0
    while done < runs:
        ticks += 1
        now = ticks * tick_seconds
        after = -1 if cursor.after is None else cursor.after
        new = [Due(started[i], i, True) for i in range(after + 1, runs) if started[i] <= now]
        waiting = [Due(at, i, False) for i, (at, _) in cursor.waiting.items()]
        everything_due = plan(waiting, new, now, budget=runs)
        for rank, item in enumerate(everything_due):
            first_seen.setdefault((item.storage_id, item.due_at), (ticks, rank))
        chosen = plan(waiting, new[:budget], now, budget)  # the sensor reads `budget` new records a tick
        assert chosen == everything_due[:budget]
        for item in chosen:
            i = item.storage_id
            seen_tick, rank = first_seen[(i, item.due_at)]
            worst_wait_ticks = max(worst_wait_ticks, ticks - seen_tick)
            worst_excess = max(worst_excess, ticks - seen_tick - rank // budget)
            run = PendingRun("s", str(i), "id", started_at=started[i], storage_id=i, polls=polls[i])
            ready = now >= started[i] + ready_after[i]
            decision = decide(run, status(RunState.READY if ready else RunState.RUNNING), now)
            polls[i] += 1
            if item.fresh:
                cursor.after = i
            cursor.waiting.pop(i, None)
            if decision.step is Step.WAIT:
                cursor.waiting[i] = (decision.run.next_poll_at, decision.run.polls)
            else:
                done += 1
                worst_delay = max(worst_delay, now - (started[i] + ready_after[i]))
        cursor = ReadinessCursor.load(cursor.dump(), LOG)
    return {
        "worst_wait_ticks": worst_wait_ticks,
        "worst_excess_ticks": worst_excess,
        "polls_per_run": sum(polls) / runs,
        "max_polls": max(polls),
        "worst_delay": worst_delay,
    }


def test_under_load_every_due_run_is_polled_in_turn_and_polls_stay_few() -> None:
    """1,000 runs started at the kick-off's 4/s, polled at 24 a tick: the sensor is the bottleneck."""
    rng = random.Random(3)
    ready_after = [rng.choice([1.0, 3.0, 30.0, 300.0, 1_800.0]) for _ in range(1_000)]
    result = simulate(1_000, ready_after, kickoff_rate=4.0, tick_seconds=30.0, budget=24)
    assert result["worst_excess_ticks"] == 0  # never later than its turn
    assert result["worst_wait_ticks"] > 10  # and the sensor was the bottleneck
    assert result["polls_per_run"] < 2.0
    assert result["max_polls"] <= 8


def test_when_polls_keep_up_runs_are_requested_soon_after_they_turn_ready() -> None:
    rng = random.Random(4)
    ready_after = [rng.uniform(1, 3_600) for _ in range(200)]
    result = simulate(200, ready_after, kickoff_rate=4.0, tick_seconds=30.0, budget=24)
    assert result["worst_excess_ticks"] == 0
    assert result["polls_per_run"] < 12  # about log2(age / 5 s) each, at most a poll every 10 minutes
    # Ready at most one backoff (capped at 10 minutes) and a tick before being requested.
    assert result["worst_delay"] <= MAX_POLL_DELAY + 2 * 30.0


# -- discovery -----------------------------------------------------------------------------------


@pytest.fixture
def fast_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sensors' share of the rate, unbounded: these simulators have no limit, and each discovery
    tick would otherwise wait a second at the gate."""
    monkeypatch.setattr("matchall_dagster.orchestration.sensors.SENSOR_REQUESTS_PER_SECOND", 1000.0)


def discover(
    instance: dg.DagsterInstance, defs: dg.Definitions, cursor: str | None = None
) -> tuple[dg.SensorExecutionData, str | None]:
    """One discovery tick, its partitions and events applied as the daemon applies them."""
    data = tick(instance, defs, DISCOVERY, cursor)
    apply_tick(instance, data)
    return data, data.cursor


def kickoffs_of(data: dg.SensorExecutionData) -> list[list[str]]:
    return [
        request.run_config["ops"]["start_match_all_runs"]["config"]["segment_ids"]
        for request in data.run_requests
        if request.job_name == "match_all_kickoff_job"
    ]


def catalog_requests(data: dg.SensorExecutionData) -> int:
    return sum(request.job_name == "activecampaign_segments_job" for request in data.run_requests)


def deletions_of(instance: dg.DagsterInstance) -> dict[str, list[str]]:
    """The deletion events of each partition, oldest first (their `matchall/status`)."""
    found: dict[str, list[str]] = {}
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=ASSET_KEY), limit=1000, ascending=True)
    for record in records.records:
        assert record.asset_observation is not None
        status = record.asset_observation.metadata[STATUS].value
        if status != "pending" and record.partition_key is not None:
            found.setdefault(record.partition_key, []).append(str(status))
    return found


def drop_segments(server: SimulatorServer, *segment_ids: str) -> list[SimSegment]:
    """Delete segments in the simulated account; returns them, to bring them back."""
    account = server.simulator.account
    gone = [s for s in account.segments if s.id in segment_ids]
    account.segments = [s for s in account.segments if s.id not in segment_ids]
    return gone


@pytest.mark.usefixtures("fast_gate")
def test_discovery_adds_segments_by_their_segment_id_and_starts_their_runs(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    # The premise: the listing's items carry ids of their own, never the segment id.
    items = httpx.get(f"{server.url}/api/3/audiences", headers={"Api-Token": DEFAULT_TOKEN}).json()["data"]
    assert all(item["id"] != item["attributes"]["segment_id"] for item in items)
    data, cursor = discover(instance, defs)
    (request,) = data.dynamic_partitions_requests
    assert isinstance(request, dg.AddDynamicPartitionsRequest)
    expected = sorted(item["attributes"]["segment_id"] for item in items)
    assert list(request.partition_keys) == expected
    assert kickoffs_of(data) == [expected]
    assert catalog_requests(data) == 1  # the first listing: the catalog is built
    assert sorted(instance.get_dynamic_partitions("segments")) == expected
    again, _ = discover(instance, defs, cursor)
    assert not again.run_requests  # nothing new, the listing unchanged: no kick-off, no catalog
    assert again.skip_message is not None
    assert "no changes" in again.skip_message


def test_discovery_honours_the_allow_list(
    instance: dg.DagsterInstance, defs: dg.Definitions, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", "10001, 1,not-there")
    (request,) = tick(instance, defs, DISCOVERY).dynamic_partitions_requests
    assert list(request.partition_keys) == ["1", "10001"]


@pytest.mark.usefixtures("fast_gate")
def test_discovery_skips_when_the_api_refuses_and_keeps_its_cursor(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop_segments(server, "77")
    _, cursor = discover(instance, defs)
    _, cursor = discover(instance, defs, cursor)  # 77 was never tracked: nothing missing
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", "wrong-key-123")
    data = tick(instance, defs, DISCOVERY, cursor)
    assert data.skip_message is not None
    assert "refused the API token" in data.skip_message
    assert "wrong-key-123" not in data.skip_message
    assert data.cursor == cursor  # a failed listing is not a listing: nothing counts as missing
    assert not data.dynamic_partitions_requests


@pytest.mark.usefixtures("fast_gate")
def test_a_segment_missing_from_two_listings_in_a_row_is_marked_deleted_and_its_rows_kept(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, duckdb_file: Path
) -> None:
    _, cursor = discover(instance, defs)
    materialize_segment(defs, instance, "1")
    drop_segments(server, "1")
    once, cursor = discover(instance, defs, cursor)
    assert "deleted_segments" not in {r.partitions_def_name for r in once.dynamic_partitions_requests}
    assert deletions_of(instance) == {}
    assert catalog_requests(once) == 1  # the listing changed
    twice, cursor = discover(instance, defs, cursor)
    (mark,) = twice.dynamic_partitions_requests
    assert isinstance(mark, dg.AddDynamicPartitionsRequest)
    assert (mark.partitions_def_name, list(mark.partition_keys)) == ("deleted_segments", ["1"])
    assert catalog_requests(twice) == 1  # its status changed
    (observation,) = twice.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert observation.partition == "1"
    assert observation.metadata["reason"].value == "missing from two listings in a row"
    assert observation.description is not None
    assert "matchall forget 1" in observation.description
    assert "rows are kept" in observation.description
    assert instance.get_dynamic_partitions("deleted_segments") == ["1"]
    assert "1" in instance.get_dynamic_partitions("segments")  # the partition stays
    assert stored_rows(duckdb_file, "1") == 1  # and so do its rows
    third, _ = discover(instance, defs, cursor)
    assert not third.asset_events  # marked once
    assert not third.run_requests


@pytest.mark.usefixtures("fast_gate")
def test_a_segment_missing_once_is_not_marked(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    _, cursor = discover(instance, defs)
    gone = drop_segments(server, "10001")
    _, cursor = discover(instance, defs, cursor)
    server.simulator.account.segments = [*server.simulator.account.segments, *gone]
    _, cursor = discover(instance, defs, cursor)
    drop_segments(server, "10001")
    data, _ = discover(instance, defs, cursor)  # missing again, but not twice in a row
    assert not data.asset_events
    assert instance.get_dynamic_partitions("deleted_segments") == []


@pytest.mark.usefixtures("fast_gate")
def test_a_deleted_segment_listed_again_comes_back(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    _, cursor = discover(instance, defs)
    gone = drop_segments(server, "25001")
    _, cursor = discover(instance, defs, cursor)
    _, cursor = discover(instance, defs, cursor)
    assert instance.get_dynamic_partitions("deleted_segments") == ["25001"]
    server.simulator.account.segments = [*server.simulator.account.segments, *gone]
    data, cursor = discover(instance, defs, cursor)
    (unmark,) = data.dynamic_partitions_requests
    assert isinstance(unmark, dg.DeleteDynamicPartitionsRequest)
    assert list(unmark.partition_keys) == ["25001"]
    (observation,) = data.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert observation.metadata[STATUS].value == "listed_again"
    assert observation.metadata["segment_name"].value == gone[0].name
    assert instance.get_dynamic_partitions("deleted_segments") == []
    assert deletions_of(instance) == {"25001": ["deleted", "listed_again"]}
    assert kickoffs_of(data) == []  # the next (daily) kick-off starts it with the others


@pytest.mark.usefixtures("fast_gate")
def test_a_partition_outside_the_allow_list_is_never_marked(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cursor = discover(instance, defs)
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", "1,10001")
    drop_segments(server, "25001", "1")
    _, cursor = discover(instance, defs, cursor)
    _, cursor = discover(instance, defs, cursor)
    assert instance.get_dynamic_partitions("deleted_segments") == ["1"]


@pytest.mark.usefixtures("fast_gate")
def test_two_listings_answering_404_mark_every_partition_deleted_and_keep_them(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer
) -> None:
    _, cursor = discover(instance, defs)
    tracked = sorted(instance.get_dynamic_partitions("segments"))
    server.simulator.account.segments = []  # the list answers 404: "no segments"
    _, cursor = discover(instance, defs, cursor)
    assert instance.get_dynamic_partitions("deleted_segments") == []
    data, _ = discover(instance, defs, cursor)
    assert sorted(instance.get_dynamic_partitions("deleted_segments")) == tracked
    assert len(data.asset_events) == len(tracked)
    assert sorted(instance.get_dynamic_partitions("segments")) == tracked  # marking never loses data


@pytest.mark.usefixtures("fast_gate")
def test_the_catalog_is_refreshed_when_names_change_and_for_sizes_at_most_hourly(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, sensor_clock: Clock
) -> None:
    account = server.simulator.account
    _, cursor = discover(instance, defs)
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        client.start_run("1")  # ready at once: the listing's counts.last_total is now this run's
    sizes, cursor = discover(instance, defs, cursor)
    assert catalog_requests(sizes) == 0  # a count changed: not yet (every finished run changes one)
    sensor_clock.advance(COUNTS_REFRESH_SECONDS)
    later, cursor = discover(instance, defs, cursor)
    assert catalog_requests(later) == 1  # an hour later, the sizes are refreshed
    quiet, cursor = discover(instance, defs, cursor)
    assert catalog_requests(quiet) == 0
    account.segments = [replace(s, name="Renamed") if s.id == "1" else s for s in account.segments]
    renamed, _ = discover(instance, defs, cursor)
    assert catalog_requests(renamed) == 1  # a name changed: at once
    (request,) = renamed.run_requests
    assert request.tags["matchall/why"] == "the listing changed"


def test_an_unreadable_discovery_cursor_starts_afresh(caplog: pytest.LogCaptureFixture) -> None:
    assert DiscoveryCursor.load("{not json", LOG) == DiscoveryCursor()
    assert "could not be read" in caplog.text
    cursor = DiscoveryCursor({"1", "x-2"}, "s", "c", 12.0)
    assert DiscoveryCursor.load(cursor.dump(), LOG) == cursor


def test_reconcile_marks_only_the_second_miss_in_a_row() -> None:
    change = reconcile(
        listed=["1", "2", "5"],
        admitted={"1", "2", "3", "4", "5"},
        partitions={"1", "3", "4", "5", "6"},
        deleted={"4", "5"},
        missing_before={"3", "1"},
    )
    assert change.new == ["2"]
    assert change.to_mark == ["3"]  # 4 is marked already; 6 is not admitted; 1 is listed again
    assert change.missing_once == set()
    assert change.listed_again == ["5"]


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
        assert request.tags["matchall/polls"] == "1"
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
    assert [request.partition_key for request in done.run_requests] == ["99"]
    assert done.run_requests[0].tags["matchall/polls"] == "2"
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
    assert [request.run_key for request in data.run_requests] == [f"99/{newer['99']}"]
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
    assert [request.run_key for request in data.run_requests] == [f"1/{latest['1']}"]
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
    assert observation.metadata["attempt"].value == 2
    assert observation.metadata["segment_name"].value == "Fails"  # the fresh run keeps the name
    assert observation.metadata["run_id"].value != runs["77"]
    assert cursor_of(data).waiting == {}  # the fresh run comes back through its record
    for event in data.asset_events:  # as the daemon does
        instance.report_runless_asset_event(event)
    sensor_clock.advance(FIRST_POLL_DELAY)
    again = tick(instance, defs, READINESS, data.cursor)
    assert checks_of(again) == [(RUN_NOT_FAILED, "77", observation.metadata["run_id"].value)]


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
    assert observation.metadata["attempt"].value == 2


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
    assert sorted(request.partition_key for request in recovered.run_requests) == ["1", "10001"]


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
    monkeypatch.setattr("matchall_dagster.orchestration.sensors.SENSOR_REQUESTS_PER_SECOND", 1000.0)  # budget unchanged
    defs = build_definitions(duckdb_database=str(duckdb_file))
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
    sensor_clock: Clock,
) -> None:
    """Ticks are killed at random points; as in the daemon, a killed tick's cursor is not saved."""
    monkeypatch.setattr("matchall_dagster.orchestration.sensors.SENSOR_REQUESTS_PER_SECOND", 1000.0)
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
        requested.extend(request.run_key or "" for request in data.run_requests)
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

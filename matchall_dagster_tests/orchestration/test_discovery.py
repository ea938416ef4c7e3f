"""The discovery sensor through `build_sensor_context` and `evaluate_tick`, and its pure decisions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import dagster as dg
import httpx
import pytest

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.definitions import build_definitions
from matchall_dagster.lifecycle.discovery import COUNTS_REFRESH_SECONDS, DiscoveryCursor, reconcile
from matchall_dagster.lifecycle.record import STATUS, key
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.simulator import DEFAULT_TOKEN, SimSegment, SimulatorServer
from matchall_dagster_tests.conftest import apply_tick, materialize_segment, set_setting
from matchall_dagster_tests.orchestration.sensor_ticks import DISCOVERY, LOG, Clock, stored_rows, tick

pytestmark = pytest.mark.usefixtures("sensor_clock")


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
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=DEFAULT_ACCOUNT.matches_key), limit=1000, ascending=True
    )
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


@pytest.mark.usefixtures("fast_budget")
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
    instance: dg.DagsterInstance, defs: dg.Definitions, duckdb_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", "10001, 1,not-there")
    defs = build_definitions(store=str(duckdb_file))  # MATCHALL_SEGMENTS is read as the definitions are built
    (request,) = tick(instance, defs, DISCOVERY).dynamic_partitions_requests
    assert list(request.partition_keys) == ["1", "10001"]


@pytest.mark.usefixtures("fast_budget")
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


@pytest.mark.usefixtures("fast_budget")
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
    assert observation.metadata[key("reason")].value == "missing from two listings in a row"
    assert observation.description is not None
    assert "matchall forget 1" in observation.description
    assert "rows are kept" in observation.description
    assert instance.get_dynamic_partitions("deleted_segments") == ["1"]
    assert "1" in instance.get_dynamic_partitions("segments")  # the partition stays
    assert stored_rows(duckdb_file, "1") == 1  # and so do its rows
    third, _ = discover(instance, defs, cursor)
    assert not third.asset_events  # marked once
    assert not third.run_requests


@pytest.mark.usefixtures("fast_budget")
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


@pytest.mark.usefixtures("fast_budget")
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
    assert observation.metadata[key("segment_name")].value == gone[0].name
    assert instance.get_dynamic_partitions("deleted_segments") == []
    assert deletions_of(instance) == {"25001": ["deleted", "listed_again"]}
    assert kickoffs_of(data) == []  # the next (daily) kick-off starts it with the others


@pytest.mark.usefixtures("fast_budget")
def test_a_partition_outside_the_allow_list_is_never_marked(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    server: SimulatorServer,
    duckdb_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, cursor = discover(instance, defs)
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", "1,10001")
    defs = build_definitions(store=str(duckdb_file))  # MATCHALL_SEGMENTS is read as the definitions are built
    drop_segments(server, "25001", "1")
    _, cursor = discover(instance, defs, cursor)
    _, cursor = discover(instance, defs, cursor)
    assert instance.get_dynamic_partitions("deleted_segments") == ["1"]


@pytest.mark.usefixtures("fast_budget")
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


@pytest.mark.usefixtures("fast_budget")
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

"""The segment catalog `activecampaign_segments`: its rows from the published listing, its metadata,
its whole-table writes through the project's IO manager (on each engine where the engine matters),
and its reads by the rest of the project (`read_catalog`), which never fail a step."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pandas as pd
import pytest

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.api.models import Segment
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.catalog import COLUMNS, PREVIEW_ROWS, read_catalog
from matchall_dagster.simulator import DEFAULT_TOKEN, SimAccount, SimSegment, SimulatorServer
from matchall_dagster.storage.store import StoreUrl, open_store
from matchall_dagster_tests.conftest import ServeSimulator, materialize_catalog
from matchall_dagster_tests.orchestration.stores import columns, failing_before_commit

TABLE = "activecampaign_segments"


def rows(store: str | Path) -> dict[str, dict[Any, Any]]:
    frame = open_store(str(store)).read_table(TABLE)
    assert frame is not None
    return {str(row["segment_id"]): row for row in frame.to_dict("records")}


def column_types(store: str | Path) -> list[tuple[str, str]]:
    """The table's columns and types as the engine's own catalog has them (DuckDB's names)."""
    return [(name, kind) for name, kind, _ in columns(store, TABLE)]


def listed(server: SimulatorServer) -> dict[str, Segment]:
    """The listing as the client parses the published shape: what the catalog must hold."""
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        return {segment.id: segment for segment in client.list_segments()}


def value(cell: Any) -> Any:
    return None if cell is None or cell is pd.NaT or (not isinstance(cell, str) and pd.isna(cell)) else cell


def materialization(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (event,) = result.asset_materializations_for_node("activecampaign_segments")
    return {key: entry.value for key, entry in event.metadata.items()}


def test_the_catalog_holds_every_listed_segment_by_its_segment_id(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: every value round-trips (missing ones included), with the column types and comments."""
    instance.add_dynamic_partitions("segments", ["1", "10001"])
    result = materialize_catalog(store_defs, instance)
    expected = listed(server)
    assert set(expected) == {segment.id for segment in server.simulator.account.segments}
    stored = rows(store_url)
    assert set(stored) == set(expected)
    for segment_id, segment in expected.items():
        row = stored[segment_id]
        assert row["name"] == segment.name
        assert row["status"] == "active"
        assert bool(row["tracked"]) is (segment_id in {"1", "10001"})
        assert value(row["last_total"]) == segment.last_total
        assert value(row["last_run_id"]) == (segment.last_run.run_id if segment.last_run else None)
        for column, expected_time in (
            ("created_date", segment.created_date),
            ("updated_date", segment.updated_date),
            ("last_used_date", segment.last_used_date),
        ):
            assert value(row[column]) == (None if expected_time is None else pd.Timestamp(expected_time))
    assert columns(store_url, TABLE) == [(name, kind, text) for name, kind, _, text in COLUMNS]

    metadata = materialization(result)
    assert metadata["dagster/row_count"] == len(expected)
    url = StoreUrl.parse(store_url)
    assert (metadata["dagster/storage_kind"], metadata["dagster/table_name"]) == (url.kind, url.table_name(TABLE))
    assert (metadata["listed"], metadata["active"], metadata["deleted"], metadata["tracked"]) == (
        len(expected),
        len(expected),
        0,
        2,
    )
    assert metadata["requests"] == 1  # the whole account in one page
    preview = str(metadata["preview"]).splitlines()
    by_name = sorted(expected.values(), key=lambda s: (s.name, s.id))[:PREVIEW_ROWS]
    first = by_name[0]
    size = "" if first.last_total is None else f"{first.last_total:,}"
    assert preview[2] == f"| {first.name} | {first.id} | {size} | active |"
    assert len(preview) == 2 + min(len(expected), PREVIEW_ROWS) + (len(expected) > PREVIEW_ROWS)
    schema = metadata["dagster/column_schema"]
    assert [(column.name, column.type) for column in schema.columns] == [(name, kind) for name, kind, *_ in COLUMNS]
    assert all(column.description for column in schema.columns)


def test_the_asset_is_declared_for_analysts_and_the_api_pool(store_defs: dg.Definitions, store_url: str) -> None:
    activecampaign_segments = store_defs.get_assets_def(DEFAULT_ACCOUNT.catalog_key)
    spec = activecampaign_segments.specs_by_key[DEFAULT_ACCOUNT.catalog_key]
    assert spec.kinds == {StoreUrl.parse(store_url).kind, "pandas"}
    assert activecampaign_segments.partitions_def is None
    schema = spec.metadata["dagster/column_schema"]
    assert {column.name for column in schema.columns} >= {"segment_id", "name", "last_total", "status"}
    assert activecampaign_segments.op.pool == DEFAULT_ACCOUNT.pool


def test_an_account_without_segments_writes_an_empty_table(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    server.simulator.account.segments = []  # the list answers 404: "no segments"
    result = materialize_catalog(store_defs, instance)
    assert rows(store_url) == {}
    assert column_types(store_url) == [(name, kind) for name, kind, *_ in COLUMNS]
    assert materialization(result)["dagster/row_count"] == 0
    assert materialization(result)["preview"] == "| name | segment_id | last_total | status |\n|---|---|---|---|"


def test_a_refresh_replaces_the_whole_table_and_a_failed_one_keeps_the_previous(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: the table replaced whole, and a write failing before its commit leaves the previous."""
    materialize_catalog(store_defs, instance)
    account = server.simulator.account
    account.segments = [replace(s, name="Renamed") if s.id == "1" else s for s in account.segments if s.id != "9999"]
    materialize_catalog(store_defs, instance)
    after = rows(store_url)
    assert set(after) == set(listed(server))  # 9999 is gone: neither listed nor tracked
    assert after["1"]["name"] == "Renamed"

    account.segments = account.segments[:2]
    with failing_before_commit(store_url, "replace_table") as written:
        assert not materialize_catalog(store_defs, instance, raise_on_error=False).success
    assert written == [2]  # the new table was written, then rolled back
    assert rows(store_url).keys() == after.keys()  # the previous table, whole
    assert [name for name, *_ in columns(store_url, TABLE)] == [name for name, *_ in COLUMNS]


def test_tracked_segments_no_longer_listed_keep_their_row_and_show_deleted_once_marked(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: a row kept is read back from the previous table and written again as it was."""
    defs = store_defs
    instance.add_dynamic_partitions("segments", ["1", "10001", "25001"])
    materialize_catalog(defs, instance)
    before = rows(store_url)
    account = server.simulator.account
    account.segments = [s for s in account.segments if s.id not in ("1", "10001", "500000")]
    instance.add_dynamic_partitions("deleted_segments", ["1"])  # as discovery or a kick-off marks it
    result = materialize_catalog(defs, instance)
    after = rows(store_url)
    assert "500000" not in after  # never tracked: it leaves the catalog with the listing
    assert after["1"]["status"] == "deleted"
    for column in ("name", "last_total", "last_run_id", "created_date"):  # as they were, missing ones included
        assert value(after["1"][column]) == value(before["1"][column]), column
    assert (after["10001"]["status"], after["10001"]["name"]) == ("active", before["10001"]["name"])  # missing once
    assert materialization(result)["deleted"] == 1

    instance.delete_dynamic_partition("segments", "1")  # forgotten (`matchall forget 1`)
    instance.delete_dynamic_partition("deleted_segments", "1")
    materialize_catalog(defs, instance)
    assert "1" not in rows(store_url)


def test_a_refused_token_fails_the_refresh_clearly_and_keeps_the_catalog(
    defs: dg.Definitions, instance: dg.DagsterInstance, duckdb_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    materialize_catalog(defs, instance)
    before = rows(duckdb_file)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", "not-the-token-4242")
    from matchall_dagster.definitions import build_definitions

    refused = build_definitions(store=str(duckdb_file))
    result = materialize_catalog(refused, instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data
    assert failure.user_failure_data is not None
    description = str(failure.user_failure_data.description)
    assert "refused the API token" in description
    assert "previous catalog is kept" in description
    assert "not-the-token-4242" not in description
    assert rows(duckdb_file).keys() == before.keys()


# -- reading the catalog --------------------------------------------------------------------------


def test_read_catalog_answers_from_the_table(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: the names and sizes the rest of the project reads back."""
    materialize_catalog(store_defs, instance)
    expected = listed(server)
    store = open_store(store_url)
    everything = read_catalog(store)
    assert set(everything) == set(expected)
    assert {segment_id: entry.name for segment_id, entry in everything.items()} == {
        segment_id: segment.name for segment_id, segment in expected.items()
    }
    (entry,) = read_catalog(store, ["10001"]).values()
    assert (entry.segment_id, entry.name, entry.last_total, entry.status) == (
        "10001",
        expected["10001"].name,
        expected["10001"].last_total,
        "active",
    )
    assert read_catalog(store, ["no-such-segment"]) == {}


_HOLD = """
import sys, time, duckdb
connection = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(30)
"""


def test_read_catalog_is_empty_without_a_file_a_table_or_access(tmp_path: Path) -> None:
    path = tmp_path / "matchall.duckdb"
    store = open_store(str(path))
    assert read_catalog(store) == {}
    assert not path.exists()  # reading never creates the file
    duckdb.connect(str(path)).close()
    assert read_catalog(store) == {}  # a file without the catalog
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "holding"
            started = time.monotonic()
            assert read_catalog(store, patience=0.3) == {}  # another process writes: no name, no wait
            assert time.monotonic() - started < 2.0
        finally:
            holder.kill()


def test_read_catalog_is_empty_without_a_table_or_a_server(postgres_store: str) -> None:
    """On PostgreSQL: a schema without the catalog, then a server that refuses connections (a closed port)."""
    assert read_catalog(open_store(postgres_store)) == {}
    url = StoreUrl.parse(postgres_store)
    unreachable = url.location.replace(":5432/", ":1/")
    assert unreachable != url.location
    started = time.monotonic()
    assert read_catalog(open_store(unreachable), patience=0.5) == {}
    assert time.monotonic() - started < 5.0


def test_segments_named_like_markdown_stay_in_their_preview_cell(
    defs: dg.Definitions, instance: dg.DagsterInstance, serve_simulator: ServeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve_simulator(SimAccount([SimSegment("5", "a | b\nc", 3)]))
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    result = materialize_catalog(defs, instance)
    preview = str(materialization(result)["preview"]).splitlines()
    assert preview[2] == "| a \\| b c | 5 | 3 | active |"

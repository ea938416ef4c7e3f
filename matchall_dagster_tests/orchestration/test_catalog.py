"""The segment catalog `activecampaign_segments`: its rows from the published listing, its metadata,
its whole-table writes through the project's DuckDB IO manager, and its reads by the rest of the
project (`read_catalog`), which never fail a step."""

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
from matchall_dagster.storage import io_manager as storage
from matchall_dagster_tests.conftest import ServeSimulator, materialize_catalog

TABLE = "main.activecampaign_segments"


def rows(duckdb_file: Path) -> dict[str, dict[Any, Any]]:
    connection = duckdb.connect(str(duckdb_file), read_only=True)
    try:
        frame = connection.execute(f"select * from {TABLE}").df()
    finally:
        connection.close()
    return {str(row["segment_id"]): row for row in frame.to_dict("records")}


def column_types(duckdb_file: Path) -> list[tuple[str, str]]:
    connection = duckdb.connect(str(duckdb_file), read_only=True)
    try:
        return [(str(name), str(kind)) for name, kind, *_ in connection.execute(f"describe {TABLE}").fetchall()]
    finally:
        connection.close()


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
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    instance.add_dynamic_partitions("segments", ["1", "10001"])
    result = materialize_catalog(defs, instance)
    expected = listed(server)
    assert set(expected) == {segment.id for segment in server.simulator.account.segments}
    stored = rows(duckdb_file)
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
    assert column_types(duckdb_file) == [(name, kind) for name, kind, *_ in COLUMNS]

    metadata = materialization(result)
    assert metadata["dagster/row_count"] == len(expected)
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


def test_the_asset_is_declared_for_analysts_and_the_api_pool(defs: dg.Definitions) -> None:
    activecampaign_segments = defs.get_assets_def(DEFAULT_ACCOUNT.catalog_key)
    spec = activecampaign_segments.specs_by_key[DEFAULT_ACCOUNT.catalog_key]
    assert spec.kinds == {"duckdb", "pandas"}
    assert activecampaign_segments.partitions_def is None
    schema = spec.metadata["dagster/column_schema"]
    assert {column.name for column in schema.columns} >= {"segment_id", "name", "last_total", "status"}
    assert activecampaign_segments.op.pool == DEFAULT_ACCOUNT.pool


def test_an_account_without_segments_writes_an_empty_table(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    server.simulator.account.segments = []  # the list answers 404: "no segments"
    result = materialize_catalog(defs, instance)
    assert rows(duckdb_file) == {}
    assert column_types(duckdb_file) == [(name, kind) for name, kind, *_ in COLUMNS]
    assert materialization(result)["dagster/row_count"] == 0
    assert materialization(result)["preview"] == "| name | segment_id | last_total | status |\n|---|---|---|---|"


def test_a_refresh_replaces_the_whole_table_and_a_failed_one_keeps_the_previous(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    duckdb_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    materialize_catalog(defs, instance)
    account = server.simulator.account
    account.segments = [replace(s, name="Renamed") if s.id == "1" else s for s in account.segments if s.id != "9999"]
    materialize_catalog(defs, instance)
    after = rows(duckdb_file)
    assert set(after) == set(listed(server))  # 9999 is gone: neither listed nor tracked
    assert after["1"]["name"] == "Renamed"

    handle_output = storage._PandasTypeHandler.handle_output

    def write_then_fail(self: Any, context: Any, table_slice: Any, obj: pd.DataFrame, connection: Any) -> Any:
        handle_output(self, context, table_slice, obj, connection)
        raise OSError("No space left on device")

    monkeypatch.setattr(storage._PandasTypeHandler, "handle_output", write_then_fail)
    account.segments = account.segments[:2]
    assert not materialize_catalog(defs, instance, raise_on_error=False).success
    assert rows(duckdb_file).keys() == after.keys()  # rolled back: the previous table, whole


def test_tracked_segments_no_longer_listed_keep_their_row_and_show_deleted_once_marked(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    instance.add_dynamic_partitions("segments", ["1", "10001", "25001"])
    materialize_catalog(defs, instance)
    before = rows(duckdb_file)
    account = server.simulator.account
    account.segments = [s for s in account.segments if s.id not in ("1", "10001", "500000")]
    instance.add_dynamic_partitions("deleted_segments", ["1"])  # as discovery or a kick-off marks it
    result = materialize_catalog(defs, instance)
    after = rows(duckdb_file)
    assert "500000" not in after  # never tracked: it leaves the catalog with the listing
    assert (after["1"]["status"], after["1"]["name"], after["1"]["last_total"]) == (
        "deleted",
        before["1"]["name"],
        before["1"]["last_total"],
    )
    assert (after["10001"]["status"], after["10001"]["name"]) == ("active", before["10001"]["name"])  # missing once
    assert materialization(result)["deleted"] == 1

    instance.delete_dynamic_partition("segments", "1")  # forgotten (`matchall forget 1`)
    instance.delete_dynamic_partition("deleted_segments", "1")
    materialize_catalog(defs, instance)
    assert "1" not in rows(duckdb_file)


def test_a_refused_token_fails_the_refresh_clearly_and_keeps_the_catalog(
    defs: dg.Definitions, instance: dg.DagsterInstance, duckdb_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    materialize_catalog(defs, instance)
    before = rows(duckdb_file)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", "not-the-token-4242")
    from matchall_dagster.definitions import build_definitions

    refused = build_definitions(duckdb_database=str(duckdb_file))
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
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    materialize_catalog(defs, instance)
    expected = listed(server)
    everything = read_catalog(str(duckdb_file))
    assert set(everything) == set(expected)
    (entry,) = read_catalog(str(duckdb_file), ["10001"]).values()
    assert (entry.segment_id, entry.name, entry.last_total, entry.status) == (
        "10001",
        expected["10001"].name,
        expected["10001"].last_total,
        "active",
    )
    assert read_catalog(str(duckdb_file), ["no-such-segment"]) == {}


_HOLD = """
import sys, time, duckdb
connection = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(30)
"""


def test_read_catalog_is_empty_without_a_file_a_table_or_access(tmp_path: Path) -> None:
    path = tmp_path / "matchall.duckdb"
    assert read_catalog(str(path)) == {}
    assert not path.exists()  # reading never creates the file
    duckdb.connect(str(path)).close()
    assert read_catalog(str(path)) == {}  # a file without the catalog
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "holding"
            started = time.monotonic()
            assert read_catalog(str(path), patience=0.3) == {}  # another process writes: no name, no wait
            assert time.monotonic() - started < 2.0
        finally:
            holder.kill()


def test_segments_named_like_markdown_stay_in_their_preview_cell(
    defs: dg.Definitions, instance: dg.DagsterInstance, serve_simulator: ServeSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve_simulator(SimAccount([SimSegment("5", "a | b\nc", 3)]))
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    result = materialize_catalog(defs, instance)
    preview = str(materialization(result)["preview"]).splitlines()
    assert preview[2] == "| a \\| b c | 5 | 3 | active |"

"""Pins what `storage.dagster_private` takes from Dagster's private `db_io_manager` module.

These classes have no public export in Dagster 1.13; the IO manager subclasses them. A Dagster
upgrade that renames them, changes a signature we call or override, or stops writing a partition
inside one connection fails here, with the name of what changed, before anything reaches a table.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg
import dagster_duckdb.io_manager as duckdb_io_manager
import pytest
from dagster_duckdb_pandas import DuckDBPandasIOManager, DuckDBPandasTypeHandler

from matchall_dagster.storage import dagster_private
from matchall_dagster.storage.dagster_private import DbClient, DbIOManager, DbTypeHandler, TableSlice
from matchall_dagster.storage.io_manager import MatchallDuckDBIOManager


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_classes_are_the_ones_dagster_duckdb_builds_on() -> None:
    # dagster-duckdb imports the same names from the same module: subclassing ours is subclassing its.
    for name in ("DbClient", "DbIOManager", "DbTypeHandler", "TableSlice"):
        assert getattr(duckdb_io_manager, name) is getattr(dagster_private, name), name
    assert issubclass(duckdb_io_manager.DuckDbClient, DbClient)
    assert issubclass(DuckDBPandasTypeHandler, DbTypeHandler)


def test_type_handler_methods_we_override_keep_their_signatures() -> None:
    assert DbTypeHandler.__abstractmethods__ == {"handle_output", "load_input", "supported_types"}
    assert parameters(DbTypeHandler.handle_output) == ["self", "context", "table_slice", "obj", "connection"]
    assert parameters(DbTypeHandler.load_input) == ["self", "context", "table_slice", "connection"]
    assert isinstance(inspect.getattr_static(DbTypeHandler, "supported_types"), property)
    assert DbTypeHandler[int] is not None  # generic: the summary handler is DbTypeHandler[PartitionSummary]


def test_db_client_static_methods_we_call_keep_their_signatures() -> None:
    client = duckdb_io_manager.DuckDbClient
    for name, expected in (
        ("connect", ["context", "_"]),
        ("delete_table_slice", ["context", "table_slice", "connection"]),
        ("get_select_statement", ["table_slice"]),
    ):
        # Called unbound (`DuckDbClient.connect(context, table_slice)`): they must stay static methods.
        assert isinstance(inspect.getattr_static(client, name), staticmethod), name
        assert len(parameters(getattr(client, name))) == len(expected), name
    assert parameters(DbClient.delete_table_slice) == ["context", "table_slice", "connection"]
    assert parameters(DbClient.get_select_statement) == ["table_slice"]


def test_io_manager_and_table_slice_take_what_we_pass() -> None:
    init = inspect.signature(DbIOManager.__init__).parameters
    for name in ("db_client", "database", "schema", "type_handlers", "default_load_type", "io_manager_name"):
        assert name in init, name
        assert init[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert {"table", "schema", "database", "columns", "partition_dimensions"} <= set(TableSlice._fields)
    # The IO manager reads the parent's configuration under these names.
    assert {"database", "schema_", "connection_config"} <= set(DuckDBPandasIOManager.model_fields)
    assert isinstance(MatchallDuckDBIOManager(database=":memory:").create_io_manager(None), DbIOManager)


class _Recorder(DbClient[list[str]]):
    """A client that logs what the IO manager does with it, in order."""

    log: list[str] = []  # noqa: RUF012  # one test's log, reset by it

    @staticmethod
    @contextmanager
    def connect(context: Any, table_slice: TableSlice) -> Iterator[list[str]]:
        _Recorder.log.append("connect")
        yield _Recorder.log
        _Recorder.log.append("close")

    @staticmethod
    def ensure_schema_exists(context: Any, table_slice: TableSlice, connection: list[str]) -> None:
        connection.append("ensure_schema_exists")

    @staticmethod
    def delete_table_slice(context: Any, table_slice: TableSlice, connection: list[str]) -> None:
        connection.append(f"delete {table_slice.schema}.{table_slice.table}")

    @staticmethod
    def get_select_statement(table_slice: TableSlice) -> str:
        return f"select * from {table_slice.schema}.{table_slice.table}"


class _RecordingHandler(DbTypeHandler[str]):
    def handle_output(self, context: Any, table_slice: TableSlice, obj: str, connection: list[str]) -> None:
        connection.append(f"write {obj}")

    def load_input(self, context: Any, table_slice: TableSlice, connection: list[str]) -> str:
        connection.append("read")
        return "rows"

    @property
    def supported_types(self) -> Sequence[type[object]]:
        return [str]


def test_a_write_deletes_and_inserts_within_one_connection() -> None:
    """The atomic replacement rests on this: the delete and the insert share the connection the
    client opened (ours begins a transaction there and commits when it closes)."""
    _Recorder.log = []
    manager = DbIOManager(
        db_client=_Recorder(), database="db", schema="main", type_handlers=[_RecordingHandler()], io_manager_name="t"
    )
    with dg.build_output_context(asset_key=dg.AssetKey("segment_matches")) as context:
        manager.handle_output(context, "frame")
    assert _Recorder.log == ["connect", "ensure_schema_exists", "delete main.segment_matches", "write frame", "close"]


@pytest.mark.parametrize("name", ["DbIOManager", "DbTypeHandler", "DbClient", "TableSlice"])
def test_dagster_still_does_not_export_them(name: str) -> None:
    """When one of these becomes public, import it from there and drop it from dagster_private."""
    assert not hasattr(dg, name), f"dagster now exports {name}: use the public name"

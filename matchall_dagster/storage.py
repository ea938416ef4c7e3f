"""Where `segment_matches` lands by default: a DuckDB file, through dagster-duckdb-pandas.

Dagster's DuckDB IO manager deletes a partition's rows and inserts the new ones in separate
autocommitted statements, so a crash in between leaves the partition empty, and it skips empty
DataFrames without creating the table. This subclass keeps everything else of it (connection
retries on file locks, loading, metadata) and changes just those two things: the delete and the
insert run in one transaction, and an empty partition still creates the table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

# DbIOManager, DbTypeHandler and TableSlice have no public export; dagster-duckdb builds its IO
# manager from the same classes.
from dagster._core.storage.db_io_manager import DbIOManager, DbTypeHandler, TableSlice
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_pandas import DuckDBPandasIOManager, DuckDBPandasTypeHandler

DUCKDB_PATH_VARIABLE = "MATCHALL_DUCKDB_PATH"
TABLE = "segment_matches"


def duckdb_path() -> str:
    """MATCHALL_DUCKDB_PATH, else matchall.duckdb under DAGSTER_HOME (else the working folder)."""
    explicit = os.environ.get(DUCKDB_PATH_VARIABLE)
    if explicit:
        return explicit
    return str(Path(os.environ.get("DAGSTER_HOME") or ".") / "matchall.duckdb")


class _TransactionalDuckDbClient(DuckDbClient):
    @staticmethod
    @contextmanager
    def connect(context: Any, table_slice: TableSlice) -> Iterator[Any]:
        with DuckDbClient.connect(context, table_slice) as connection:
            try:
                connection.begin()
                yield connection
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            finally:
                connection.close()

    @staticmethod
    def delete_table_slice(context: dg.OutputContext, table_slice: TableSlice, connection: Any) -> None:
        # The parent ignores a missing table by catching the error, which would abort our
        # transaction; ask first instead.
        (exists,) = connection.execute(
            "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
            [table_slice.schema, table_slice.table],
        ).fetchone()
        if exists:
            DuckDbClient.delete_table_slice(context, table_slice, connection)


class _PandasTypeHandler(DuckDBPandasTypeHandler):
    def handle_output(
        self, context: dg.OutputContext, table_slice: TableSlice, obj: pd.DataFrame, connection: Any
    ) -> Mapping[str, Any] | None:
        if obj.empty:  # an empty segment is a real answer: its table must still exist
            table = f"{table_slice.schema}.{table_slice.table}"
            connection.execute(f"create table if not exists {table} as select * from obj")  # noqa: S608  # names, no data
            context.add_output_metadata({"dagster/partition_row_count": 0})
            return None
        metadata: Mapping[str, Any] | None = super().handle_output(context, table_slice, obj, connection)
        return metadata


class MatchallDuckDBIOManager(DuckDBPandasIOManager):
    """dagster-duckdb-pandas' IO manager, with atomic partition replacement."""

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler[Any]]:
        return [_PandasTypeHandler()]

    def create_io_manager(self, context: Any) -> DbIOManager:
        return DbIOManager(
            db_client=_TransactionalDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=self.type_handlers(),
            default_load_type=pd.DataFrame,
            io_manager_name="MatchallDuckDBIOManager",
        )

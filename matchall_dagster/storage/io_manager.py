"""Where `segment_matches` lands by default: a DuckDB file, through dagster-duckdb-pandas.

Dagster's DuckDB IO manager deletes a partition's rows (or an unpartitioned table's) and inserts
the new ones in separate autocommitted statements, so a crash in between leaves them empty, and it
skips empty DataFrames without creating the table. This subclass keeps everything else of it
(connection retries on file locks, loading, metadata) and changes just those two things: the
delete and the insert run in one transaction (an unpartitioned frame replaces its whole table,
columns included), and an empty frame still creates the table. Two more, for
segments of millions: an input annotated `PartitionSummary` is answered by SQL in the database
(row count, position range, repeated ids) instead of loading the rows into pandas, and DuckDB's
memory is capped (`DEFAULT_MEMORY_LIMIT`, spilling to disk beyond it) unless `connection_config`
sets `memory_limit`: by default DuckDB takes up to 80% of the machine's memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_pandas import DuckDBPandasIOManager, DuckDBPandasTypeHandler

# No public export of these in Dagster 1.13; the one private import, pinned by a test.
from matchall_dagster.storage.dagster_private import DbIOManager, DbTypeHandler, TableSlice

TABLE = "segment_matches"
# Enough for DuckDB to write 10,000,000 rows at full speed and to group them with little spilling
# (a Dagster process itself takes about 220 MB before any data).
DEFAULT_MEMORY_LIMIT = "128MB"
_BITMAP_SPAN_PER_ROW = 16  # a bitmap of at most 2 bytes a row


class _TransactionalDuckDbClient(DuckDbClient):
    @staticmethod
    @contextmanager
    def connect(context: Any, table_slice: TableSlice) -> Iterator[Any]:
        with DuckDbClient.connect(context, table_slice) as connection:
            try:
                if "memory_limit" not in context.resource_config["connection_config"]:
                    connection.execute(f"set memory_limit = '{DEFAULT_MEMORY_LIMIT}'")
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
        if _table_exists(table_slice, connection):
            DuckDbClient.delete_table_slice(context, table_slice, connection)


def _table_exists(table_slice: TableSlice, connection: Any) -> bool:
    ((exists,),) = connection.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [table_slice.schema, table_slice.table],
    ).fetchall()
    return bool(exists)


@dataclass(frozen=True)
class PartitionSummary:
    """What a check needs to judge a stored partition of `segment_matches`, without its rows.

    `repeated_contacts` and `repeated_positions` count the rows beyond the first of each value
    (0 when all are distinct); the positions are exactly 1..rows when `min_position` is 1,
    `max_position` is `rows` and none repeats.
    """

    rows: int
    min_position: int | None
    max_position: int | None
    repeated_contacts: int
    repeated_positions: int

    @property
    def positions_exact(self) -> bool:
        return self.rows == 0 or (
            self.min_position == 1 and self.max_position == self.rows and self.repeated_positions == 0
        )


class _SummaryTypeHandler(DbTypeHandler[PartitionSummary]):
    """Loads a partition as a `PartitionSummary`: a few aggregates, never the rows themselves.

    Repeats are counted with a bitmap over the column's range (`bitstring_agg`: 0.15 s and a few
    MB at 10,000,000 rows) when the range is at most `_BITMAP_SPAN_PER_ROW` times the rows, else
    by grouping, which DuckDB spills to disk under its memory limit (about 1.5 s at 10,000,000).
    """

    def handle_output(
        self, context: dg.OutputContext, table_slice: TableSlice, obj: PartitionSummary, connection: Any
    ) -> None:
        raise TypeError("PartitionSummary is read from a stored partition, never written; return a DataFrame.")

    def load_input(self, context: dg.InputContext, table_slice: TableSlice, connection: Any) -> PartitionSummary:
        if (table_slice.partition_dimensions and not context.asset_partition_keys) or not _table_exists(
            table_slice, connection
        ):
            return PartitionSummary(0, None, None, 0, 0)
        # The partition's rows, filtered by the parent's statement (the key as an escaped literal).
        rows_of = f"({DuckDbClient.get_select_statement(table_slice)}) as part"
        ((rows, low, high, low_id, high_id),) = connection.execute(
            f"select count(*), min(position), max(position), min(contact_id), max(contact_id) from {rows_of}"  # noqa: S608  # names, no data
        ).fetchall()

        def repeated(column: str, low: int | None, high: int | None) -> int:
            if low is None or high is None:  # no rows
                return 0
            if high - low + 1 <= _BITMAP_SPAN_PER_ROW * rows:
                ((distinct,),) = connection.execute(
                    f"select bit_count(bitstring_agg({column}, ?, ?)) from {rows_of}",  # noqa: S608
                    [low, high],
                ).fetchall()
                return int(rows) - int(distinct)
            ((count,),) = connection.execute(
                f"select coalesce(sum(n - 1), 0) from (select count(*) as n from {rows_of} group by {column}) "  # noqa: S608
                "where n > 1"
            ).fetchall()
            return int(count)

        return PartitionSummary(
            rows=int(rows),
            min_position=None if low is None else int(low),
            max_position=None if high is None else int(high),
            repeated_contacts=repeated("contact_id", low_id, high_id),
            repeated_positions=repeated("position", low, high),
        )

    @property
    def supported_types(self) -> Sequence[type[object]]:
        return [PartitionSummary]


class _PandasTypeHandler(DuckDBPandasTypeHandler):
    def handle_output(
        self, context: dg.OutputContext, table_slice: TableSlice, obj: pd.DataFrame, connection: Any
    ) -> Mapping[str, Any] | None:
        # The parent skips an empty frame; an empty segment is a real answer, and its table must
        # still exist. DuckDB reads the frame's columns in place (numpy and Arrow buffers, no copy).
        # An unpartitioned frame is the whole table: replaced, columns included (a new column of a
        # later release must not fail the insert), in the same transaction as everything else.
        table = f"{table_slice.schema}.{table_slice.table}"
        exists = _table_exists(table_slice, connection)
        connection.register(_ROWS_VIEW, obj)
        try:
            if not table_slice.partition_dimensions:
                connection.execute(f"create or replace table {table} as select * from {_ROWS_VIEW}").fetchall()  # noqa: S608
            elif exists:
                connection.execute(f"insert into {table} select * from {_ROWS_VIEW}").fetchall()  # noqa: S608  # names, no data
            else:
                connection.execute(f"create table {table} as select * from {_ROWS_VIEW}").fetchall()  # noqa: S608
        finally:
            connection.unregister(_ROWS_VIEW)
        columns = [(str(name), str(dtype)) for name, dtype in obj.dtypes.items()]
        context.add_output_metadata(_frame_metadata(columns, len(obj), partitioned=context.has_partition_key))
        return None


_ROWS_VIEW = "matchall_rows"


def _frame_metadata(columns: list[tuple[str, str]], rows: int, *, partitioned: bool) -> dict[str, Any]:
    """The parent's metadata, built where no frame is in scope, on purpose.

    Dagster compiles a record class's constructor (TableColumn, TableSchema, ...) on its first use
    and keeps the calling frame's local variables with it for the life of the process: built in
    `handle_output`, the first write of a process would keep its whole frame alive.
    """
    schema = dg.TableSchema(columns=[dg.TableColumn(name=name, type=kind) for name, kind in columns])
    return {
        "dagster/partition_row_count" if partitioned else "dagster/row_count": rows,
        "dagster/storage_kind": "duckdb",
        "dataframe_columns": dg.MetadataValue.table_schema(schema),
    }


class MatchallDuckDBIOManager(DuckDBPandasIOManager):
    """dagster-duckdb-pandas' IO manager, with atomic partition replacement, partition summaries
    computed in SQL, and a memory limit."""

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler[Any]]:
        return [_PandasTypeHandler(), _SummaryTypeHandler()]

    def create_io_manager(self, context: Any) -> DbIOManager:
        return DbIOManager(
            db_client=_TransactionalDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=self.type_handlers(),
            default_load_type=pd.DataFrame,
            io_manager_name="MatchallDuckDBIOManager",
        )

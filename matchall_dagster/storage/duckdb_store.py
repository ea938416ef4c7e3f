"""The DuckDB engine of the membership store: one file, the embedded default.

DuckDB lets one process at a time open a file for writing. Every write here waits its turn: a
connection refused for the file's lock is retried with backoff for `LOCK_PATIENCE_SECONDS`, so
that runs writing at once (four reads and the history, say) take turns instead of failing.
Readers that can do without (names and sizes from the catalog) wait only briefly.

A partition is replaced by a delete and an insert in one transaction (readers see one or the
other; a crash keeps the old rows). The frame is read in place (numpy and Arrow buffers, no copy).
DuckDB's memory is capped (`MEMORY_LIMIT`, spilling to disk beyond it): by default DuckDB takes
up to 80 % of the machine's memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from matchall_dagster.storage import history
from matchall_dagster.storage.store import (
    EMPTY_SUMMARY,
    MATCHES_COMMENTS,
    MATCHES_TABLE,
    Column,
    MembershipStore,
    PartitionSummary,
    StoreUnavailableError,
    comment_statement,
)

__all__ = ["LOCK_PATIENCE_SECONDS", "MEMORY_LIMIT", "DuckDBStore"]

# Enough for DuckDB to write 10,000,000 rows at full speed and to group them with little spilling
# (a Dagster process itself takes about 220 MB before any data).
MEMORY_LIMIT = "128MB"
LOCK_PATIENCE_SECONDS = 600.0  # a writer waits this long for the file (a 10,000,000-row write holds it ~3 s)
_BITMAP_SPAN_PER_ROW = 16  # a bitmap of at most 2 bytes a row
_ROWS_VIEW = "matchall_rows"
_EMPTY_PARTITION = pd.DataFrame(
    {
        "segment_id": pd.Series(dtype="string"),
        "position": pd.Series(dtype="int64"),
        "contact_id": pd.Series(dtype="int64"),
    }
)
_MATCHES_DDL = (
    f"create table if not exists {MATCHES_TABLE} "
    "(segment_id varchar not null, position bigint not null, contact_id bigint not null)"
)


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


class _Session:
    """`history.Sql` on a DuckDB connection."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self.connection = connection

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.connection.execute(statement, list(params)).fetchall()

    def change(self, statement: str, params: Sequence[Any] = ()) -> int:
        result = self.connection.execute(statement, list(params)).fetchall()
        return int(result[0][0]) if result and result[0] and isinstance(result[0][0], int) else 0


class DuckDBStore(MembershipStore):
    kind = "duckdb"

    @property
    def path(self) -> str:
        return self.url.location

    def _new_connection(self) -> AbstractContextManager[Any]:
        return self.connect()  # an opening costs tens of milliseconds: a batch holds one

    @contextmanager
    def connect(self, *, read_only: bool = False, patience: float = LOCK_PATIENCE_SECONDS) -> Iterator[Any]:
        """A connection to the file, waiting up to `patience` s for another process's lock."""
        if self._held is not None:
            yield self._held
            return

        @retry(
            retry=retry_if_exception(_locked),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(patience),
            reraise=True,
        )
        def connect() -> duckdb.DuckDBPyConnection:
            return duckdb.connect(self.path, read_only=read_only)

        if read_only and not Path(self.path).is_file():
            raise StoreUnavailableError(f"No DuckDB file at {self.path} yet.")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = connect()
        except duckdb.Error as exc:
            raise StoreUnavailableError(
                f"Could not open the DuckDB file {self.path} ({str(exc).splitlines()[0][:200]})."
            ) from exc
        try:
            connection.execute(f"set memory_limit = '{MEMORY_LIMIT}'")
            yield connection
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as connection:
            connection.begin()
            try:
                yield connection
                connection.commit()
            except BaseException:
                connection.rollback()
                raise

    def replace_partition(self, segment_id: str, frame: pd.DataFrame) -> None:
        with self.transaction() as connection:
            _ensure_matches(connection)
            connection.register(_ROWS_VIEW, frame)
            try:
                connection.execute(f"delete from {MATCHES_TABLE} where segment_id = ?", [segment_id])  # noqa: S608
                connection.execute(
                    f"insert into {MATCHES_TABLE} select ?, position, contact_id from {_ROWS_VIEW}",  # noqa: S608
                    [segment_id],
                )
            finally:
                connection.unregister(_ROWS_VIEW)

    def _written(self) -> bool:
        return self._held is not None or Path(self.path).is_file()

    def summarize(self, segment_id: str) -> PartitionSummary:
        """Repeats are counted with a bitmap over the column's range (`bitstring_agg`: 0.15 s and a few MB
        at 10,000,000 rows) when the range is at most `_BITMAP_SPAN_PER_ROW` times the rows, else by
        grouping, which DuckDB spills to disk under its memory limit (about 1.5 s at 10,000,000)."""
        if not self._written():
            return EMPTY_SUMMARY
        with self.connect(read_only=True) as connection:
            if not _exists(connection, MATCHES_TABLE):
                return EMPTY_SUMMARY
            part = f"(select * from {MATCHES_TABLE} where segment_id = $segment) as part"  # noqa: S608
            ((rows, low, high, low_id, high_id),) = connection.execute(
                f"select count(*), min(position), max(position), min(contact_id), max(contact_id) from {part}",  # noqa: S608
                {"segment": segment_id},
            ).fetchall()

            def repeated(column: str, low: int | None, high: int | None) -> int:
                if low is None or high is None:  # no rows
                    return 0
                if high - low + 1 <= _BITMAP_SPAN_PER_ROW * rows:
                    ((distinct,),) = connection.execute(
                        f"select bit_count(bitstring_agg({column}, $low, $high)) from {part}",  # noqa: S608
                        {"segment": segment_id, "low": low, "high": high},
                    ).fetchall()
                    return int(rows) - int(distinct)
                ((count,),) = connection.execute(
                    f"select coalesce(sum(n - 1), 0) from (select count(*) as n from {part} group by {column}) "  # noqa: S608
                    "where n > 1",
                    {"segment": segment_id},
                ).fetchall()
                return int(count)

            return PartitionSummary(
                rows=int(rows),
                min_position=None if low is None else int(low),
                max_position=None if high is None else int(high),
                repeated_contacts=repeated("contact_id", low_id, high_id),
                repeated_positions=repeated("position", low, high),
            )

    def read_partition(self, segment_id: str) -> pd.DataFrame:
        if not self._written():
            return _EMPTY_PARTITION.copy()
        with self.connect(read_only=True) as connection:
            if not _exists(connection, MATCHES_TABLE):
                return _EMPTY_PARTITION.copy()
            query = (
                f"select segment_id, position, contact_id from {MATCHES_TABLE} where segment_id = ? order by position"  # noqa: S608
            )
            frame: pd.DataFrame = connection.execute(query, [segment_id]).df()
            return frame

    def replace_table(self, table: str, frame: pd.DataFrame, columns: Sequence[Column] | None = None) -> None:
        with self.transaction() as connection:
            connection.register(_ROWS_VIEW, frame)
            try:
                if columns is None:
                    connection.execute(f"create or replace table {table} as select * from {_ROWS_VIEW}")  # noqa: S608
                else:
                    definition = ", ".join(f"{column.name} {column.sql_type}" for column in columns)
                    names = ", ".join(column.name for column in columns)
                    connection.execute(f"create or replace table {table} ({definition})")
                    connection.execute(f"insert into {table} select {names} from {_ROWS_VIEW}")  # noqa: S608
                    for column in columns:
                        if column.description:
                            connection.execute(comment_statement(table, column.name, column.description))
            finally:
                connection.unregister(_ROWS_VIEW)

    def read_table(self, table: str, *, patience: float = 2.0) -> pd.DataFrame | None:
        try:
            with self.connect(read_only=True, patience=patience) as connection:
                if not _exists(connection, table):
                    return None
                frame: pd.DataFrame = connection.execute(f"select * from {table}").df()  # noqa: S608  # a constant name
                return frame
        except StoreUnavailableError:
            return None

    def record_step(self, segment_id: str, *, source: str, run_id: str, observed_at: datetime) -> history.Step:
        with self.transaction() as connection:
            _ensure_history(connection)
            return history.record(
                _Session(connection), segment_id, source=source, run_id=run_id, observed_at=observed_at
            )

    def steps_since(self, segment_id: str, since: datetime | None) -> list[tuple[Any, ...]] | None:
        with self.connect(read_only=True, patience=10.0) as connection:
            if not _exists(connection, history.STEPS_TABLE) or not _has_any_step(connection):
                return None
            steps: list[tuple[Any, ...]] = connection.execute(
                history.STEPS_QUERY, [segment_id, since, since]
            ).fetchall()
            return steps

    def changes_since(self, segment_id: str, since: datetime | None, batch_rows: int) -> Iterator[pd.DataFrame]:
        with self.connect(read_only=True, patience=10.0) as connection:
            relation = connection.sql(history.CHANGES_QUERY, params=[segment_id, since, since])
            for batch in relation.to_arrow_reader(batch_rows):
                yield batch.to_pandas()


def _exists(connection: Any, table: str) -> bool:
    ((count,),) = connection.execute(
        "select count(*) from information_schema.tables where table_schema = current_schema() and table_name = ?",
        [table],
    ).fetchall()
    return bool(count)


def _has_any_step(connection: Any) -> bool:
    return bool(connection.execute(history.ANY_STEP_QUERY).fetchall())


def _ensure_matches(connection: Any) -> None:
    if _exists(connection, MATCHES_TABLE):
        return
    connection.execute(_MATCHES_DDL)
    for column, text in MATCHES_COMMENTS.items():
        connection.execute(comment_statement(MATCHES_TABLE, column, text))


def _ensure_history(connection: Any) -> None:
    missing = [table for table in history.TABLES if not _exists(connection, table)]
    for statement in history.SCHEMA:
        connection.execute(statement)
    for table in missing:
        for statement in history.comment_statements(table):
            connection.execute(statement)

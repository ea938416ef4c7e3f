"""The PostgreSQL engine of the membership store: several writers at once, from any node.

`segment_matches` is a table partitioned by list on `segment_id`, one partition (a table of its
own, `segment_matches_<hash of the id>`) per segment. A partition is replaced by a swap, in one
transaction:
1. a new table is created and filled by one binary COPY (`COPY ... FREEZE`: the rows are written
   frozen, so vacuum never has to freeze them). The COPY stream is built by numpy, 26 bytes a row,
   a chunk at a time, never a Python object a row;
2. the parent is locked, the old partition dropped, the new one renamed and attached (its check
   constraint proves the partition bound, so attaching scans nothing).

Readers see the old partition or the new one; a process killed mid-write leaves the old one (the
new table goes with the rolled-back transaction); the old rows leave with their table, so a
replacement leaves no dead rows behind. Writers of different segments contend only for the
instant of the swap; the history takes a per-segment advisory lock.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

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

__all__ = ["COPY_CHUNK_ROWS", "PostgresStore", "partition_table"]

COPY_CHUNK_ROWS = 1_000_000  # 26 MB of COPY data at a time
CONNECT_TIMEOUT_SECONDS = 10
# A summary's distinct counts sort millions of values, in the server's memory rather than in runs on disk.
SUMMARY_WORK_MEM = "64MB"
# A step's full join hashes millions of members in small batches, which stay in the CPU's caches: at
# 10,000,000 members it took 7 s with 4MB and 16 s with 64MB (one table in memory, random accesses).
HISTORY_WORK_MEM = "4MB"
# A step that changed at least this many rows of the state analyzes it (after its commit, a few tenths of
# a second), so that the next step plans its joins for the segment's true size.
ANALYZE_AFTER_CHANGES = 100_000
# A binary COPY row: the field count, then each field's length and big-endian value.
_ROW = np.dtype([("fields", ">i2"), ("position_size", ">i4"), ("position", ">i8"), ("id_size", ">i4"), ("id", ">i8")])
_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)
_ready: set[tuple[str, str]] = set()  # (server, schema) whose tables this process has created or seen


def _sql(template: str, *names: str) -> sql.Composed:
    """A statement with table and column names quoted as identifiers."""
    return sql.SQL(template).format(*map(sql.Identifier, names))


def partition_table(segment_id: str) -> str:
    """The partition's table: segment ids are not all identifiers, and a hash keeps the name short."""
    return f"{MATCHES_TABLE}_{hashlib.sha256(segment_id.encode()).hexdigest()[:20]}"


def copy_chunks(positions: np.ndarray, contact_ids: np.ndarray) -> Iterator[bytes]:
    """The binary COPY stream of (position, contact_id), header to trailer, `COPY_CHUNK_ROWS` rows a chunk."""
    yield _HEADER
    rows = np.empty(min(len(contact_ids), COPY_CHUNK_ROWS), dtype=_ROW)
    rows["fields"], rows["position_size"], rows["id_size"] = 2, 8, 8
    for start in range(0, len(contact_ids), COPY_CHUNK_ROWS):
        chunk = rows[: min(COPY_CHUNK_ROWS, len(contact_ids) - start)]
        chunk["position"] = positions[start : start + len(chunk)]
        chunk["id"] = contact_ids[start : start + len(chunk)]
        yield chunk.tobytes()
    yield _TRAILER


class _Session:
    """`history.Sql` on a psycopg cursor: `?` placeholders become psycopg's `%s`."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.cursor = cursor

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.cursor.execute(statement.replace("?", "%s"), list(params)).fetchall()

    def change(self, statement: str, params: Sequence[Any] = ()) -> int:
        self.cursor.execute(statement.replace("?", "%s"), list(params))
        return max(self.cursor.rowcount, 0)


class PostgresStore(MembershipStore):
    kind = "postgresql"

    def _new_connection(self) -> AbstractContextManager[Any]:
        return self._connection()

    @contextmanager
    def _connection(self, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> Iterator[psycopg.Connection[Any]]:
        if self._held is not None:
            yield self._held
            return
        try:
            connection = psycopg.connect(self.url.location, connect_timeout=max(1, int(timeout)), autocommit=True)
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"Could not connect to the store {self.url} ({str(exc).strip().splitlines()[0][:200]}). Check that "
                f"the server is up and that PGPASSWORD (or ~/.pgpass) holds the user's password."
            ) from None
        with connection:
            self._prepare(connection)
            yield connection

    @contextmanager
    def transaction(self, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> Iterator[psycopg.Connection[Any]]:
        """A connection in one transaction (committed at the end, rolled back on an error), on the schema."""
        with self._connection(timeout=timeout) as connection, connection.transaction():
            yield connection

    def _prepare(self, connection: psycopg.Connection[Any]) -> None:
        schema = sql.Identifier(self.url.schema)
        key = (self.url.location, self.url.schema)
        if key not in _ready:
            with connection.transaction():
                # One process at a time creates the tables (concurrent `if not exists` can still collide).
                connection.execute("select pg_advisory_xact_lock(hashtext(%s))", [f"matchall-ddl:{self.url.schema}"])
                connection.execute(sql.SQL("create schema if not exists {}").format(schema))
                connection.execute(sql.SQL("set local search_path to {}").format(schema))
                _create_tables(connection)
            _ready.add(key)
        connection.execute(sql.SQL("set search_path to {}").format(schema))

    def replace_partition(self, segment_id: str, frame: pd.DataFrame) -> None:
        part = partition_table(segment_id)
        staging = f"{part}_{uuid.uuid4().hex[:8]}"
        value = sql.Literal(segment_id)
        with self.transaction() as connection:
            connection.execute(
                sql.SQL(
                    "create table {} (segment_id varchar not null default {} check (segment_id = {}), "
                    "position bigint not null, contact_id bigint not null)"
                ).format(sql.Identifier(staging), value, value)
            )
            positions = frame["position"].to_numpy(dtype=np.int64, copy=False)
            contact_ids = frame["contact_id"].to_numpy(dtype=np.int64, copy=False)
            with connection.cursor().copy(
                _sql("copy {} (position, contact_id) from stdin (format binary, freeze)", staging)
            ) as copy:
                for chunk in copy_chunks(positions, contact_ids):
                    copy.write(chunk)
            # The swap: every writer takes the parent's lock here, and only here (never earlier in its
            # transaction), so writers queue for an instant instead of deadlocking.
            connection.execute(_sql("lock table {} in access exclusive mode", MATCHES_TABLE))
            connection.execute(_sql("drop table if exists {}", part))
            connection.execute(_sql("alter table {} rename to {}", staging, part))
            connection.execute(
                sql.SQL("alter table {} attach partition {} for values in ({})").format(
                    sql.Identifier(MATCHES_TABLE), sql.Identifier(part), value
                )
            )

    def summarize(self, segment_id: str) -> PartitionSummary:
        with self.transaction() as connection:
            if not _has_partition(connection, segment_id):
                return EMPTY_SUMMARY
            connection.execute(f"set local work_mem = '{SUMMARY_WORK_MEM}'")
            # One scan; distinct counts by sorting (five times faster here than grouping with a hash).
            row = connection.execute(
                _sql(
                    "select count(*), min(position), max(position), count(distinct contact_id), "
                    "count(distinct position) from {}",
                    partition_table(segment_id),
                )
            ).fetchone()
            assert row is not None
            rows, low, high, contacts, positions = (None if value is None else int(value) for value in row)
            assert rows is not None
            assert contacts is not None
            assert positions is not None
            return PartitionSummary(
                rows=rows,
                min_position=low,
                max_position=high,
                repeated_contacts=rows - contacts,
                repeated_positions=rows - positions,
            )

    def read_partition(self, segment_id: str) -> pd.DataFrame:
        with self.transaction() as connection:
            rows = connection.execute(
                _sql(
                    "select segment_id, position, contact_id from {} where segment_id = %s order by position",
                    MATCHES_TABLE,
                ),
                [segment_id],
            ).fetchall()
        return pd.DataFrame(rows, columns=["segment_id", "position", "contact_id"])

    def replace_table(self, table: str, frame: pd.DataFrame, columns: Sequence[Column] | None = None) -> None:
        names = list(frame.columns) if columns is None else [column.name for column in columns]
        types = _types(frame) if columns is None else {column.name: column.sql_type for column in columns}
        staging = f"{table}_{uuid.uuid4().hex[:8]}"
        with self.transaction() as connection:
            definition = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(types[n])) for n in names
            )
            connection.execute(sql.SQL("create table {} ({})").format(sql.Identifier(staging), definition))
            columns_sql = sql.SQL(", ").join(map(sql.Identifier, names))
            with connection.cursor().copy(
                sql.SQL("copy {} ({}) from stdin").format(sql.Identifier(staging), columns_sql)
            ) as copy:
                for row in frame[names].astype(object).itertuples(index=False):
                    copy.write_row([None if pd.isna(value) else value for value in row])
            connection.execute(_sql("drop table if exists {}", table))
            connection.execute(_sql("alter table {} rename to {}", staging, table))
            for column in columns or ():
                if column.description:
                    connection.execute(comment_statement(table, column.name, column.description))

    def read_table(self, table: str, *, patience: float = 2.0) -> pd.DataFrame | None:
        try:
            with self.transaction(timeout=patience) as connection:
                if not _exists(connection, table):
                    return None
                cursor = connection.execute(_sql("select * from {}", table))
                names = [column.name for column in cursor.description or ()]
                return pd.DataFrame(cursor.fetchall(), columns=names)
        except StoreUnavailableError:
            return None

    def record_step(self, segment_id: str, *, source: str, run_id: str, observed_at: datetime) -> history.Step:
        with self.transaction() as connection:
            # Two recordings of one segment at once would both compare with the same previous state.
            connection.execute("select pg_advisory_xact_lock(hashtext(%s))", [f"matchall-history:{segment_id}"])
            connection.execute(f"set local work_mem = '{HISTORY_WORK_MEM}'")
            step = history.record(
                _Session(connection.cursor()), segment_id, source=source, run_id=run_id, observed_at=observed_at
            )
        if step.joined + step.left >= ANALYZE_AFTER_CHANGES:
            # Outside the step's transaction: its lock on the table's statistics lasts only the analyze.
            with self._connection() as connection:
                connection.execute(_sql("analyze {}", history.STATE_TABLE))
        return step

    def steps_since(self, segment_id: str, since: datetime | None) -> list[tuple[Any, ...]] | None:
        with self.transaction() as connection:
            if (
                not _exists(connection, history.STEPS_TABLE)
                or not connection.execute(history.ANY_STEP_QUERY).fetchone()
            ):
                return None
            return _Session(connection.cursor()).rows(history.STEPS_QUERY, [segment_id, since, since])

    def changes_since(self, segment_id: str, since: datetime | None, batch_rows: int) -> Iterator[pd.DataFrame]:
        # A server-side cursor: fetched a batch at a time (closed with the block, else psycopg warns).
        with self.transaction() as connection, connection.cursor(name="matchall_changes") as cursor:
            cursor.execute(history.CHANGES_QUERY.replace("?", "%s"), [segment_id, since, since])
            names = ["observed_at", "change", "contact_id", "run_id"]
            while batch := cursor.fetchmany(batch_rows):
                yield pd.DataFrame(batch, columns=names)


def _exists(connection: psycopg.Connection[Any], table: str) -> bool:
    row = connection.execute("select to_regclass(%s) is not null", [table]).fetchone()
    return bool(row and row[0])


def _has_partition(connection: psycopg.Connection[Any], segment_id: str) -> bool:
    return _exists(connection, partition_table(segment_id))


def _create_tables(connection: psycopg.Connection[Any]) -> None:
    connection.execute(
        sql.SQL(
            "create table if not exists {} (segment_id varchar not null, position bigint not null, "
            "contact_id bigint not null) partition by list (segment_id)"
        ).format(sql.Identifier(MATCHES_TABLE))
    )
    for column, text in MATCHES_COMMENTS.items():
        connection.execute(comment_statement(MATCHES_TABLE, column, text))
    for statement in history.SCHEMA:
        connection.execute(statement)
    for table in history.TABLES:
        for statement in history.comment_statements(table):
            connection.execute(statement)
    # A step reads one segment's state by this index, not every segment's rows. On segment_id alone, the
    # index is small (one key, deduplicated, per segment) and a step's inserts append to it; with
    # contact_id, a first step of 10,000,000 members descends to a random leaf 10,000,000 times.
    connection.execute(
        f"create index if not exists {history.STATE_TABLE}_segment on {history.STATE_TABLE} (segment_id)"
    )


_PG_TYPES = {"b": "boolean", "i": "bigint", "u": "bigint", "f": "double precision", "M": "timestamptz"}


def _types(frame: pd.DataFrame) -> dict[str, str]:
    return {str(name): _PG_TYPES.get(getattr(dtype, "kind", "O"), "varchar") for name, dtype in frame.dtypes.items()}

"""What a store's database really holds, seen without the store: for the storage tests of both engines.

Every helper takes a store URL (`store_url` fixture: a DuckDB file, then a PostgreSQL schema) and
opens a connection of its own: the test checks the database, not what the store says of it.
Statements are written with `?` placeholders, as for DuckDB; PostgreSQL gets `%s`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from matchall_dagster.storage.store import MATCHES_TABLE, StoreUrl

DUCKDB_TYPES = {"VARCHAR": "varchar", "BIGINT": "bigint", "TIMESTAMP WITH TIME ZONE": "timestamptz"}
POSTGRES_TYPES = {"character varying": "varchar", "bigint": "bigint", "timestamp with time zone": "timestamptz"}


def parsed(url: str | StoreUrl) -> StoreUrl:
    return url if isinstance(url, StoreUrl) else StoreUrl.parse(url)


class Database:
    """One connection to the store's database (DuckDB: the file; PostgreSQL: the schema, autocommit)."""

    def __init__(self, url: str | StoreUrl, connection: Any) -> None:
        self.url = parsed(url)
        self.connection = connection

    @property
    def postgres(self) -> bool:
        return self.url.kind == "postgresql"

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            cursor = self.connection.execute(statement.replace("?", "%s"), list(params))
            return cursor.fetchall() if cursor.description else []
        found: list[tuple[Any, ...]] = self.connection.execute(statement, list(params)).fetchall()
        return found

    def value(self, statement: str, params: Sequence[Any] = ()) -> Any:
        ((value,),) = self.rows(statement, params)
        return value

    def tables(self) -> set[str]:
        """The tables of the store's schema (PostgreSQL: partitions included)."""
        if self.postgres:
            return {
                name for (name,) in self.rows("select tablename from pg_tables where schemaname = ?", [self.url.schema])
            }
        return {name for (name,) in self.rows("select table_name from duckdb_tables() where schema_name = 'main'")}

    def columns(self, table: str) -> dict[str, tuple[str, str | None]]:
        """Each column of the table: (its type, normalized across engines; its comment)."""
        if self.postgres:
            found = self.rows(
                "select a.attname, format_type(a.atttypid, a.atttypmod), col_description(a.attrelid, a.attnum) "
                "from pg_attribute a join pg_class c on c.oid = a.attrelid "
                "join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = ? and c.relname = ? and a.attnum > 0 and not a.attisdropped order by a.attnum",
                [self.url.schema, table],
            )
            return {name: (POSTGRES_TYPES.get(kind, kind), comment) for name, kind, comment in found}
        found = self.rows(
            "select column_name, data_type, comment from duckdb_columns() "
            "where schema_name = 'main' and table_name = ? order by column_index",
            [table],
        )
        return {name: (DUCKDB_TYPES.get(kind, kind), comment) for name, kind, comment in found}

    def partition_sizes(self) -> dict[str, int]:
        """Rows of segment_matches by segment, as a reader of the whole table sees them."""
        if MATCHES_TABLE not in self.tables():
            return {}
        return {
            segment: int(count)
            for segment, count in self.rows(f"select segment_id, count(*) from {MATCHES_TABLE} group by segment_id")
        }

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        self.rows(statement, params)


@contextmanager
def database(url: str | StoreUrl) -> Iterator[Database]:
    """A connection of the test's own to the store's database."""
    store = parsed(url)
    if store.kind == "duckdb":
        with duckdb.connect(store.location) as connection:
            yield Database(store, connection)
        return
    with psycopg.connect(store.location, autocommit=True) as connection:
        connection.execute(sql.SQL("set search_path to {}").format(sql.Identifier(store.schema)))
        yield Database(store, connection)


def frame(contact_ids: Sequence[int] | np.ndarray[Any, Any], positions: Sequence[int] | None = None) -> pd.DataFrame:
    """The rows a store replaces a partition with: `position` (1..n unless given) and `contact_id`."""
    ids = np.asarray(contact_ids, dtype=np.int64)
    where = np.arange(1, ids.size + 1, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
    return pd.DataFrame({"position": where, "contact_id": ids})


def version_ids(version: int, size: int, *, seed: int = 0) -> np.ndarray[Any, Any]:
    """`size` distinct contact ids, shuffled, of a range of their own per `version` (so that two
    versions never share an id and a mix of two shows in any sum)."""
    return np.random.default_rng(seed + version).permutation(size).astype(np.int64) + version * 100_000_000

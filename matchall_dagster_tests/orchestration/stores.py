"""What the orchestration tests read and change in a membership store, on either engine: the rows of
a partition as the project reads them (`open_store`), a statement run as an operator would run it
(DuckDB's file, or a psycopg connection on the store's schema), a table's columns from the engine's
own catalog, and a write made to fail just before its commit."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import psycopg
from psycopg import sql

from matchall_dagster.storage.store import MembershipStore, StoreUrl, open_store


def parsed(store: str | Path) -> StoreUrl:
    return StoreUrl.parse(str(store))


def stored(store: str | Path, segment_id: str) -> list[int]:
    """The partition's contact ids in position order (read through the store); positions must be exactly 1..n."""
    frame = open_store(str(store)).read_partition(segment_id)
    assert set(frame["segment_id"]) <= {segment_id}
    positions = [int(position) for position in frame["position"]]
    assert positions == list(range(1, len(frame) + 1))
    return [int(contact_id) for contact_id in frame["contact_id"]]


def execute(store: str | Path, statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run `statement` (`?` placeholders) on the store's tables, outside the project's code; its rows, if any."""
    url = parsed(store)
    if url.kind == "duckdb":
        with duckdb.connect(url.location) as connection:
            result = connection.execute(statement, params or [])
            return result.fetchall() if result.description else []
    with psycopg.connect(url.location, autocommit=True) as connection:
        connection.execute(sql.SQL("set search_path to {}").format(sql.Identifier(url.schema)))
        cursor = connection.execute(statement.replace("?", "%s"), params or [])
        return cursor.fetchall() if cursor.description else []


def count(store: str | Path, table: str, where: str = "true", params: list[Any] | None = None) -> int:
    ((found,),) = execute(store, f"select count(*) from {table} where {where}", params)
    return int(found)


def table_exists(store: str | Path, table: str) -> bool:
    url = parsed(store)
    if url.kind == "duckdb" and not Path(url.location).exists():
        return False
    return bool(
        count(
            store,
            "information_schema.tables",
            "table_schema = ? and table_name = ?",
            [url.schema, table],
        )
    )


_PG_TYPES = {"character varying": "VARCHAR"}


def columns(store: str | Path, table: str) -> list[tuple[str, str, str | None]]:
    """The table's columns in order: name, type (as DuckDB names it), comment; read from the engine's catalog."""
    url = parsed(store)
    if url.kind == "duckdb":
        query = (
            "select column_name, data_type, comment from duckdb_columns() "
            "where schema_name = ? and table_name = ? order by column_index"
        )
        return [(name, kind, comment) for name, kind, comment in execute(store, query, [url.schema, table])]
    query = (
        "select attname, format_type(atttypid, atttypmod), col_description(attrelid, attnum) from pg_attribute "
        "where attrelid = to_regclass(?) and attnum > 0 and not attisdropped order by attnum"
    )
    return [
        (name, _PG_TYPES.get(kind, kind.upper()), comment)
        for name, kind, comment in execute(store, query, [f"{url.schema}.{table}"])
    ]


@contextmanager
def failing_before_commit(store: str | Path, method: str, only: Collection[str] | None = None) -> Iterator[list[int]]:
    """Inside, the engine's `method` (`replace_partition`, `replace_table`) fails once its rows are written,
    before its transaction commits, as a full disk or a lost connection would (for the segments or tables in
    `only`, else for all); yields the row counts written."""
    engine = type(open_store(str(store)))
    real = getattr(engine, method)
    written: list[int] = []

    def write_then_fail(self: MembershipStore, key: str, frame: pd.DataFrame, *args: Any, **kwargs: Any) -> None:
        if only is not None and key not in only:
            real(self, key, frame, *args, **kwargs)
            return
        transaction = type(self).transaction  # type: ignore[attr-defined]  # both engines have one

        @contextmanager
        def failing_at_commit(*targs: Any, **tkwargs: Any) -> Iterator[Any]:
            with transaction(self, *targs, **tkwargs) as connection:
                yield connection
                written.append(len(frame))  # the new rows are in, not committed
                raise OSError("No space left on device (injected)")

        self.transaction = failing_at_commit  # type: ignore[attr-defined]
        try:
            real(self, key, frame, *args, **kwargs)
        finally:
            del self.transaction  # type: ignore[attr-defined]

    setattr(engine, method, write_then_fail)
    try:
        yield written
    finally:
        setattr(engine, method, real)

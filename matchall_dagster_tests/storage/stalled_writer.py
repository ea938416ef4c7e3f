"""A process that replaces a partition and stops in the middle of the write, for a test to kill -9 it there.

    python -m matchall_dagster_tests.storage.stalled_writer STORE_URL SEGMENT_ID ROWS [swap]

It prints `writing` once its write is under way, then never finishes it:
- DuckDB: `writing` as the insert of the new rows starts; the transaction then stalls before its
  commit (the kill lands during the insert or at the commit, never after it);
- PostgreSQL: `writing` after the first chunk of the binary COPY was sent; the COPY then stalls;
- PostgreSQL with `swap`: no stall here; the test holds a reader's lock on segment_matches, so
  the write stops at the swap, its rows copied, waiting for the parent's lock.
The rows are ids 1..ROWS in a shuffled order.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np

from matchall_dagster.storage import postgres_store
from matchall_dagster.storage.store import StoreUrl, open_store
from matchall_dagster_tests.storage.engines import frame

STALL_SECONDS = 3_600.0  # until killed


def announce() -> None:
    print("writing", flush=True)


class _StallingConnection:
    """A DuckDB connection that announces the insert and never commits."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._connection = connection

    def execute(self, statement: str, *args: Any) -> Any:
        if statement.lstrip().lower().startswith("insert into segment_matches"):
            announce()
        return self._connection.execute(statement, *args)

    def commit(self) -> None:
        time.sleep(STALL_SECONDS)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def stall_duckdb() -> None:
    connect = duckdb.connect

    def stalling(*args: Any, **kwargs: Any) -> Any:
        return _StallingConnection(connect(*args, **kwargs))

    duckdb.connect = stalling  # this process only


def stall_postgres() -> None:
    chunks = postgres_store.copy_chunks

    def stalling(positions: np.ndarray[Any, Any], contact_ids: np.ndarray[Any, Any]) -> Iterator[bytes]:
        stream = chunks(positions, contact_ids)
        yield next(stream)  # the header
        yield next(stream)  # the first chunk of rows
        announce()
        time.sleep(STALL_SECONDS)
        yield from stream

    postgres_store.copy_chunks = stalling


def main(url: str, segment_id: str, rows: int, mode: str = "") -> None:
    store = open_store(url)
    if mode == "swap":
        announce()
    elif StoreUrl.parse(url).kind == "duckdb":
        stall_duckdb()
    else:
        stall_postgres()
    ids = np.random.default_rng(1).permutation(rows).astype(np.int64) + 1
    store.replace_partition(segment_id, frame(ids))
    print("committed", flush=True)  # reached only when nothing stopped the write


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])

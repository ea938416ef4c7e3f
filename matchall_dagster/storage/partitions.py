"""A partition of `segment_matches` written and summarized on a DuckDB connection, outside the IO manager.

The batch of small segments (`orchestration.small_reads`) writes many partitions in one run, so
it cannot return one output per partition through the IO manager. It writes the same table the
same way: the partition's old rows deleted and the new ones inserted in one transaction (readers
see one or the other, a crash keeps the old), the table created from the first frame if missing.
The summary that `matches_complete` judges is computed by the database, as the IO manager's is.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from matchall_dagster.storage.io_manager import TABLE, PartitionSummary

__all__ = ["replace_partition", "stored_metadata", "summarize"]

_ROWS_VIEW = "matchall_partition_rows"


def replace_partition(connection: Any, segment_id: str, frame: pd.DataFrame, *, schema: str = "main") -> None:
    """Replace the rows of partition `segment_id` with `frame` (the asset's columns), atomically."""
    table = f"{schema}.{TABLE}"
    connection.register(_ROWS_VIEW, frame)
    connection.begin()
    try:
        connection.execute(f"create table if not exists {table} as select * from {_ROWS_VIEW} where false")  # noqa: S608  # names, no data
        connection.execute(f"delete from {table} where segment_id = ?", [segment_id])  # noqa: S608
        connection.execute(f"insert into {table} select * from {_ROWS_VIEW}")  # noqa: S608
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.unregister(_ROWS_VIEW)


def summarize(connection: Any, segment_id: str, *, schema: str = "main") -> PartitionSummary:
    """What `matches_complete` needs of a stored partition, counted by the database.

    By grouping: meant for the small partitions the batch writes (one page, 10,000 rows at most);
    the IO manager's summary uses bitmaps for partitions of millions.
    """
    ((rows, low, high, contacts, positions),) = connection.execute(
        f"select count(*), min(position), max(position), count(distinct contact_id), count(distinct position) "  # noqa: S608
        f"from {schema}.{TABLE} where segment_id = ?",
        [segment_id],
    ).fetchall()
    return PartitionSummary(
        rows=int(rows),
        min_position=None if low is None else int(low),
        max_position=None if high is None else int(high),
        repeated_contacts=int(rows) - int(contacts),
        repeated_positions=int(rows) - int(positions),
    )


def stored_metadata(database: str, rows: int, *, schema: str = "main") -> dict[str, Any]:
    """The storage metadata the IO manager adds to a materialization, for one written here."""
    return {
        "dagster/partition_row_count": rows,
        "dagster/storage_kind": "duckdb",
        "dagster/table_name": f"{database}.{schema}.{TABLE}",
    }

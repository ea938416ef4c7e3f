"""The membership store's contract, on each engine (`store_url`: a DuckDB file, then a PostgreSQL schema).

What a store must keep whatever the engine: the tables and their column comments, a partition
replaced (not appended) and the others untouched, the catalog replaced whole with its columns'
comments, and the partition summary computed by the database. Then what only one engine has to
prove: DuckDB's writers wait for the file's lock and its memory is capped; PostgreSQL replaces a
partition without leaving dead rows or growing. Atomicity under readers, failures and kill -9 is
in `test_atomicity`; the history in `test_history`; the URL in `test_store_url`.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matchall_dagster.orchestration.catalog import COLUMNS as CATALOG_COLUMNS
from matchall_dagster.storage import history
from matchall_dagster.storage.duckdb_store import MEMORY_LIMIT, DuckDBStore
from matchall_dagster.storage.postgres_store import partition_table
from matchall_dagster.storage.store import (
    CATALOG_TABLE,
    MATCHES_COMMENTS,
    MATCHES_TABLE,
    Column,
    MembershipStore,
    PartitionSummary,
    StoreUrl,
    open_store,
)
from matchall_dagster_tests.storage.engines import database, frame, version_ids

T0 = datetime(2026, 11, 1, 6, tzinfo=UTC)
HOSTILE = "x' or '1'='1"
MATCHES_TYPES = {"segment_id": "varchar", "position": "bigint", "contact_id": "bigint"}


def stored(store: MembershipStore, segment_id: str) -> list[int]:
    """The partition's contact ids in position order, checking that the positions are 1..n."""
    rows = store.read_partition(segment_id)
    assert rows["position"].tolist() == list(range(1, len(rows) + 1))
    assert set(rows["segment_id"]) <= {segment_id}
    return [int(contact_id) for contact_id in rows["contact_id"]]


# -- the tables -------------------------------------------------------------------------------


def test_the_tables_exist_with_a_comment_on_every_column(store_url: str) -> None:
    store = open_store(store_url)
    store.replace_partition("1", frame([5, 3]))
    store.record_step("1", source="m1", run_id="run-1", observed_at=T0)
    with database(store_url) as db:
        assert {MATCHES_TABLE, *history.TABLES} <= db.tables()
        matches = db.columns(MATCHES_TABLE)
        assert matches == {name: (MATCHES_TYPES[name], MATCHES_COMMENTS[name]) for name in MATCHES_TYPES}
        for table in history.TABLES:
            columns = db.columns(table)
            assert {name: comment for name, (_, comment) in columns.items()} == history.COMMENTS[table], table
            assert all(comment for _, comment in columns.values()), table
        changes = db.columns(history.CHANGES_TABLE)
        assert {name: kind for name, (kind, _) in changes.items()} == {
            "segment_id": "varchar",
            "contact_id": "bigint",
            "change": "varchar",
            "run_id": "varchar",
            "observed_at": "timestamptz",
        }


def catalog_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows in the catalog's own dtypes (string, boolean, Int64, UTC timestamps; missing values as NA)."""
    names = [name for name, *_ in CATALOG_COLUMNS]
    table = pd.DataFrame(rows, columns=names, dtype=object)
    for name, _, dtype, _ in CATALOG_COLUMNS:
        column = table[name].where(table[name].notna(), None)
        table[name] = (
            pd.to_datetime(column, utc=True).astype(dtype) if "datetime" in str(dtype) else column.astype(dtype)
        )
    return table


def plain(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows with engine-neutral values: None for missing, UTC timestamps, Python scalars."""

    def value(cell: Any) -> Any:
        if cell is None or cell is pd.NA or cell is pd.NaT or (isinstance(cell, float) and cell != cell):
            return None
        if isinstance(cell, datetime):
            return pd.Timestamp(cell).tz_convert(UTC)
        return cell.item() if isinstance(cell, np.generic) else cell

    return [{str(key): value(cell) for key, cell in row.items()} for row in table.to_dict("records")]


def test_the_catalog_is_replaced_whole_with_its_columns_types_and_comments(store_url: str) -> None:
    store = open_store(store_url)
    assert store.read_table(CATALOG_TABLE) is None  # not written yet
    columns = [Column(name, kind, text) for name, kind, _, text in CATALOG_COLUMNS]
    first = catalog_frame(
        [
            {"segment_id": "1", "name": "Newsletter's readers", "status": "active", "tracked": True,
             "last_total": 1_234, "last_run_id": "abc", "last_run_start": "2026-11-01T06:00:00Z",
             "created_date": "2020-01-02T03:04:05+02:00"},
            {"segment_id": "2", "name": None, "status": "deleted", "tracked": False},
        ]
    )  # fmt: skip
    store.replace_table(CATALOG_TABLE, first, columns)
    with database(store_url) as db:
        described = db.columns(CATALOG_TABLE)
    assert {name: comment for name, (_, comment) in described.items()} == {c.name: c.description for c in columns}
    assert described["last_total"][0] == "bigint"
    assert described["last_run_start"][0] == "timestamptz"
    read = store.read_table(CATALOG_TABLE)
    assert read is not None
    assert plain(read.sort_values("segment_id")) == plain(first)
    assert plain(read)[0]["created_date"] == pd.Timestamp("2020-01-02T01:04:05Z")

    # Replaced whole: fewer rows, another set of columns (the frame's own types without `columns`).
    store.replace_table(CATALOG_TABLE, pd.DataFrame({"segment_id": pd.Series(["3"], dtype="string")}))
    read = store.read_table(CATALOG_TABLE)
    assert read is not None
    assert plain(read) == [{"segment_id": "3"}]
    store.replace_table(CATALOG_TABLE, catalog_frame([]), columns)  # no rows: the table still exists, typed
    read = store.read_table(CATALOG_TABLE)
    assert read is not None
    assert read.empty
    assert list(read.columns) == [c.name for c in columns]


# -- a partition at a time --------------------------------------------------------------------


def test_a_partition_is_replaced_not_appended_and_the_others_are_untouched(store_url: str) -> None:
    store = open_store(store_url)
    store.replace_partition("1", frame([11, 12, 13, 14, 15]))
    store.replace_partition("2", frame([21, 22]))
    store.replace_partition("1", frame([15, 14]))  # fewer rows, another order
    assert stored(store, "1") == [15, 14]
    assert stored(store, "2") == [21, 22]
    store.replace_partition("1", frame([]))  # the segment emptied: its rows go, the others stay
    assert stored(store, "1") == []
    with database(store_url) as db:
        assert db.partition_sizes() == {"2": 2}
    store.replace_partition("1", frame([16]))
    with database(store_url) as db:
        assert db.partition_sizes() == {"1": 1, "2": 2}
        assert {name: kind for name, (kind, _) in db.columns(MATCHES_TABLE).items()} == MATCHES_TYPES


def test_a_partition_is_read_back_in_position_order(store_url: str) -> None:
    store = open_store(store_url)
    store.replace_partition("7", frame([30, 10, 20], positions=[3, 1, 2]))
    rows = store.read_partition("7")
    assert list(rows.columns) == ["segment_id", "position", "contact_id"]
    assert rows.values.tolist() == [["7", 1, 10], ["7", 2, 20], ["7", 3, 30]]
    never = open_store(store_url).read_partition("8")
    assert never.empty
    assert list(never.columns) == ["segment_id", "position", "contact_id"]


@pytest.mark.parametrize("segment_id", [HOSTILE, "1'); drop table segment_matches; --", "a/../b", "é 1"])
def test_any_segment_id_is_a_value_never_sql(store_url: str, segment_id: str) -> None:
    """Ids reaching the store are validated upstream; the store still treats them as values only."""
    store = open_store(store_url)
    store.replace_partition("1", frame([1, 2]))
    store.replace_partition(segment_id, frame([7, 8, 9]))
    store.replace_partition(segment_id, frame([6]))
    assert stored(store, segment_id) == [6]
    assert stored(store, "1") == [1, 2]
    assert store.summarize(segment_id) == PartitionSummary(1, 1, 1, 0, 0)
    with database(store_url) as db:
        assert db.partition_sizes() == {"1": 2, segment_id: 1}


# -- the summary (what matches_complete judges) ---------------------------------------------------


# Dense ids take DuckDB's bitmap over their range, ids spread over 2**55 its grouping.
@pytest.mark.parametrize("spread", [3, 2**52], ids=["dense", "sparse"])
def test_the_summary_counts_rows_positions_and_repeats_exactly(store_url: str, spread: int) -> None:
    store = open_store(store_url)
    ids = [spread * n + 11 for n in (5, 1, 4, 2, 3, 9, 8)]
    store.replace_partition("2", frame([ids[0]] * 3, positions=[1, 1, 9]))  # another partition: never counted
    store.replace_partition("1", frame(ids))
    exact = store.summarize("1")
    assert exact == PartitionSummary(7, 1, 7, 0, 0)
    assert exact.positions_exact

    # An id three times (two repeats); a position twice and the one it replaced missing.
    tampered = [ids[2], ids[1], ids[2], ids[3], ids[4], ids[2], ids[6]]
    store.replace_partition("1", frame(tampered, positions=[1, 2, 3, 3, 5, 6, 7]))
    summary = store.summarize("1")
    assert summary == PartitionSummary(7, 1, 7, repeated_contacts=2, repeated_positions=1)
    assert not summary.positions_exact

    store.replace_partition("1", frame(ids, positions=range(11, 18)))  # 11..17, not 1..7
    shifted = store.summarize("1")
    assert shifted == PartitionSummary(7, 11, 17, 0, 0)
    assert not shifted.positions_exact

    store.replace_partition("1", frame(ids[:3], positions=[1, 2, 4]))  # a gap: 3 is missing
    gap = store.summarize("1")
    assert gap == PartitionSummary(3, 1, 4, 0, 0)
    assert not gap.positions_exact
    assert store.summarize("2") == PartitionSummary(3, 1, 9, repeated_contacts=2, repeated_positions=1)


def test_the_summary_of_a_large_partition_matches_numpy(store_url: str) -> None:
    """300,000 rows with 1,000 ids repeated: the database's counts are numpy's."""
    rng = np.random.default_rng(5)
    ids = version_ids(1, 300_000)
    ids[rng.choice(300_000, 1_000, replace=False)] = ids[:1_000]  # some of these land on ids[:1_000] itself
    store = open_store(store_url)
    store.replace_partition("big", frame(ids))
    assert store.summarize("big") == PartitionSummary(
        300_000, 1, 300_000, repeated_contacts=300_000 - np.unique(ids).size, repeated_positions=0
    )


def test_the_summary_of_an_empty_or_never_written_partition(store_url: str) -> None:
    """A store never written to has empty partitions (the DuckDB file or the schema may not exist yet)."""
    store = open_store(store_url)
    nothing = PartitionSummary(0, None, None, 0, 0)
    assert store.summarize("1") == nothing  # no table yet (DuckDB), no partition (PostgreSQL)
    assert store.read_partition("1").empty
    store.replace_partition("2", frame([4]))
    assert store.summarize("1") == nothing  # the table, but never this partition
    store.replace_partition("1", frame([]))
    empty = store.summarize("1")
    assert empty == nothing
    assert empty.positions_exact


# -- DuckDB: one writer at a time, and its memory capped ----------------------------------------------

HOLD_THE_FILE = """
import sys, duckdb
connection = duckdb.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
connection.close()
"""


def test_duckdb_writers_wait_for_the_file_lock_of_another_process(tmp_path: Path) -> None:
    """Another process holds the file: a read for names gives up after its patience (None), a write
    waits (DuckDB's lock error is retried, never raised) and lands once the file is free."""
    url = f"duckdb://{tmp_path / 'locked.duckdb'}"
    store = open_store(url)
    store.replace_partition("1", frame([1]))
    store.replace_table(CATALOG_TABLE, pd.DataFrame({"segment_id": ["1"]}))
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_FILE, str(tmp_path / "locked.duckdb")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert holder.stdout.readline() == "held\n"
        assert store.read_table(CATALOG_TABLE, patience=0.5) is None  # unavailable: a read that can do without
        outcome: list[BaseException | None] = []

        def write() -> None:
            try:
                open_store(url).replace_partition("1", frame([2, 3]))
                outcome.append(None)
            except BaseException as exc:  # the test reports it
                outcome.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(timeout=3.0)
        assert writer.is_alive(), f"the write did not wait for the lock: {outcome}"  # still waiting, not failed
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
        writer.join(timeout=120)
        assert outcome == [None]
    assert stored(store, "1") == [2, 3]


def test_duckdb_memory_is_capped(tmp_path: Path) -> None:
    """DuckDB would take up to 80 % of the machine's memory; the store's connections cap it."""
    store = DuckDBStore(StoreUrl.parse(str(tmp_path / "capped.duckdb")))
    with store.connect() as connection:
        limit = connection.execute("select current_setting('memory_limit')").fetchone()[0]
        connection.execute(f"set memory_limit = '{MEMORY_LIMIT}'")  # what the setting reads as
        expected = connection.execute("select current_setting('memory_limit')").fetchone()[0]
        connection.execute("reset memory_limit")
        default = connection.execute("select current_setting('memory_limit')").fetchone()[0]
    assert limit == expected
    assert limit != default


# -- PostgreSQL: one table per partition, swapped --------------------------------------------------


def tree(db: Any) -> dict[str, int]:
    """The partitions attached to segment_matches: their table's name and oid."""
    return dict(
        db.rows(
            "select c.relname, c.oid::bigint from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent = to_regclass(?)",
            [MATCHES_TABLE],
        )
    )


def test_postgres_partitions_are_tables_of_their_own(postgres_store: str) -> None:
    store = open_store(postgres_store)
    for segment_id in ("1", HOSTILE, "a" * 300):
        store.replace_partition(segment_id, frame([1, 2]))
    with database(postgres_store) as db:
        assert db.value("select relkind from pg_class where oid = to_regclass(?)", [MATCHES_TABLE]) == "p"
        assert set(tree(db)) == {partition_table(s) for s in ("1", HOSTILE, "a" * 300)}
        bounds = db.rows(
            "select pg_get_expr(c.relpartbound, c.oid) from pg_class c join pg_inherits i on i.inhrelid = c.oid "
            "where i.inhparent = to_regclass(?) and c.relname = ?",
            [MATCHES_TABLE, partition_table(HOSTILE)],
        )
        assert bounds == [("FOR VALUES IN ('x'' or ''1''=''1')",)]


def test_postgres_replacements_leave_no_dead_rows_and_no_growth(postgres_store: str) -> None:
    """Ten replacements of a 300,000-row partition: each is a new table (the old one dropped with its
    rows, nothing for vacuum), and the database holds about one copy of the rows, not ten."""
    store = open_store(postgres_store)
    store.replace_partition("other", frame(version_ids(9, 1_000)))
    sizes, oids = [], []
    for version in range(10):
        store.replace_partition("1", frame(version_ids(version, 300_000)))
        with database(postgres_store) as db:
            (table,) = (name for name in tree(db) if name != partition_table("other"))
            oids.append(tree(db)[table])
            sizes.append(
                db.value("select sum(pg_total_relation_size(relid))::bigint from pg_partition_tree(?)", [MATCHES_TABLE])
            )
            if version == 0:
                database_size = db.value("select pg_database_size(current_database())")
            dead = db.value(
                "select coalesce(sum(n_dead_tup), 0) from pg_stat_user_tables where schemaname = ? and relname like ?",
                [db.url.schema, f"{MATCHES_TABLE}%"],
            )
            assert dead == 0
    assert len(set(oids)) == 10  # a new table each time ...
    with database(postgres_store) as db:
        assert db.value("select count(*) from pg_class where oid = any(?)", [oids[:-1]]) == 0  # ... the old ones gone
        assert sizes[-1] <= sizes[0] * 1.05
        growth = db.value("select pg_database_size(current_database())") - database_size
    assert growth < 0.2 * sizes[0]  # the catalog's own rows for ten tables, not nine copies of the rows
    assert stored(store, "1")[:3] == version_ids(9, 300_000)[:3].tolist()
    assert len(stored(store, "other")) == 1_000

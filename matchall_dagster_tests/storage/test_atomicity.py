"""Replacing a partition is atomic, on each engine: a reader sees the old rows or the new ones, never
a mix; a write that fails, or a writer killed with SIGKILL in the middle, leaves the old rows, and
on PostgreSQL no table of its own behind; the next replacement then works."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import duckdb
import numpy as np
import pytest

from matchall_dagster.storage import history, postgres_store
from matchall_dagster.storage.store import MATCHES_TABLE, PartitionSummary, StoreUrl, open_store
from matchall_dagster_tests.storage.engines import Database, database, frame, version_ids

# A replacement's size each time: the reader tells them apart by count, last position and sum of ids.
SIZES = (1_000_000, 1_600_000, 1_200_000, 2_000_000)
KILLED_ROWS = 3_000_000
PATIENCE = 120.0  # how long a test waits for something that must happen (a deadline, never a measure)


def fingerprint(ids: np.ndarray[Any, Any]) -> tuple[int, int, int]:
    return (int(ids.size), int(ids.size), int(ids.sum()))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Waited {PATIENCE:.0f} s for {what}.")
        time.sleep(0.02)


def test_a_reader_sees_the_old_rows_or_the_new_never_a_mix(store_url: str) -> None:
    """A reader polls the partition while it is replaced with 1-2 million rows, three times, each
    time another size: every poll sees one whole version (count, last position and sum of ids),
    in the order they were written, and the partition beside it untouched."""
    versions = [version_ids(version, size) for version, size in enumerate(SIZES)]
    expected = [fingerprint(ids) for ids in versions]
    store = open_store(store_url)
    store.replace_partition("1", frame(versions[0]))
    store.replace_partition("2", frame([1, 2, 3]))
    seen: list[tuple[int, ...]] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def read() -> None:
        try:
            with database(store_url) as db:  # DuckDB: a connection of this process, beside the writer's
                while not stop.is_set():
                    (row,) = db.rows(
                        f"select count(*), coalesce(max(position), 0), coalesce(sum(contact_id), 0) "
                        f"from {MATCHES_TABLE} where segment_id = ?",
                        ["1"],
                    )
                    beside = db.value(f"select count(*) from {MATCHES_TABLE} where segment_id = ?", ["2"])
                    seen.append((*(int(value) for value in row), int(beside)))
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    def seen_last(version: tuple[int, ...]) -> Callable[[], bool]:
        return lambda: (*version, 3) in seen[-5:] or bool(failures)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: bool(seen) or bool(failures), "the reader's first poll")
        for ids, version in zip(versions[1:], expected[1:], strict=True):
            store.replace_partition("1", frame(ids))
            # The next write only once the reader saw this one: each version is seen, in order.
            wait_until(seen_last(version), f"the reader to see {version}")
    finally:
        stop.set()
        reader.join()
    assert not failures
    assert {polled[:3] for polled in seen} <= set(expected), "a reader saw a partition that was no version"
    assert {polled[3] for polled in seen} == {3}
    order = [polled[:3] for index, polled in enumerate(seen) if index == 0 or polled[:3] != seen[index - 1][:3]]
    assert order == expected


# -- a write that fails ---------------------------------------------------------------------------


class _FailingCommit:
    """A DuckDB connection whose commit first has another connection read the partition, then fails."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, seen: list[Any]) -> None:
        self._connection = connection
        self._seen = seen

    def commit(self) -> None:
        other = self._connection.cursor()  # another connection to the same database
        try:
            self._seen.append(
                other.execute(
                    f"select contact_id from {MATCHES_TABLE} where segment_id = '1' order by position"
                ).fetchall()
            )
        finally:
            other.close()
        raise OSError("No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def fail_mid_write(store_url: str, monkeypatch: pytest.MonkeyPatch, seen: list[Any]) -> None:
    """Make the next replacement fail once its rows are written, before they are committed; just
    before failing, another connection reads partition 1 into `seen`."""
    if StoreUrl.parse(store_url).kind == "duckdb":
        connect = duckdb.connect
        monkeypatch.setattr(duckdb, "connect", lambda *a, **k: _FailingCommit(connect(*a, **k), seen))
        return
    chunks = postgres_store.copy_chunks

    def failing(positions: Any, contact_ids: Any) -> Iterator[bytes]:
        yield from chunks(positions, contact_ids)
        with database(store_url) as other:
            seen.append(other.rows(f"select contact_id from {MATCHES_TABLE} where segment_id = '1' order by position"))
        raise OSError("No space left on device")

    monkeypatch.setattr(postgres_store, "copy_chunks", failing)


@pytest.mark.parametrize("replacement", [[4, 5, 6, 7], []], ids=["rows", "empty"])
def test_a_failure_inside_the_write_leaves_the_previous_rows_exactly(
    store_url: str, monkeypatch: pytest.MonkeyPatch, replacement: list[int]
) -> None:
    store = open_store(store_url)
    store.replace_partition("1", frame([3, 1, 2]))
    store.replace_partition("2", frame([9]))
    with database(store_url) as db:
        tables = db.tables()
    seen: list[Any] = []
    fail_mid_write(store_url, monkeypatch, seen)
    with pytest.raises(OSError, match="No space left"):
        store.replace_partition("1", frame(replacement))
    monkeypatch.undo()
    assert seen == [[(3,), (1,), (2,)]]  # while the write was under way, others read the old rows
    assert store.read_partition("1")["contact_id"].tolist() == [3, 1, 2]  # rolled back: exactly as before
    assert store.read_partition("2")["contact_id"].tolist() == [9]
    with database(store_url) as db:
        assert db.tables() == tables  # PostgreSQL: the new table went with the transaction
    store.replace_partition("1", frame(replacement))
    assert store.read_partition("1")["contact_id"].tolist() == replacement


# -- a writer killed ------------------------------------------------------------------------------


def lines(stream: IO[str]) -> queue.Queue[str]:
    """The stream's lines as they come ('' at its end), read by a thread."""
    found: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            found.put(line.strip())
        found.put("")

    threading.Thread(target=pump, daemon=True).start()
    return found


def start_writer(store_url: str, rows: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`stalled_writer` replacing partition 1 with `rows` rows, once it says its write is under way;
    its PostgreSQL sessions carry an application name of their own."""
    name = f"matchall-killed-{uuid.uuid4().hex[:8]}"
    writer = subprocess.Popen(
        [sys.executable, "-m", "matchall_dagster_tests.storage.stalled_writer", store_url, "1", str(rows), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PGAPPNAME": name},
    )
    assert writer.stdout is not None
    try:
        line = lines(writer.stdout).get(timeout=PATIENCE)
    except queue.Empty:
        line = "(nothing)"
    if line != "writing":
        writer.kill()
        _, errors = writer.communicate()
        pytest.fail(f"The writer did not start its write: {line!r}\n{errors}")
    return writer, name


def kill(writer: subprocess.Popen[str]) -> None:
    os.kill(writer.pid, signal.SIGKILL)
    writer.communicate()
    assert writer.returncode == -signal.SIGKILL


def sessions(db: Database, name: str) -> int:
    return int(db.value("select count(*) from pg_stat_activity where application_name = ?", [name]))


def check_left_intact(store_url: str, old: np.ndarray[Any, Any], name: str) -> None:
    """The old rows, whole and readable; on PostgreSQL, the killed session gone and nothing of its write left."""
    store = open_store(store_url)
    if StoreUrl.parse(store_url).kind == "postgresql":
        with database(store_url) as db:
            wait_until(lambda: sessions(db, name) == 0, "the server to end the killed writer's session")
            partitions = {postgres_store.partition_table(s) for s in ("1", "2")}
            assert db.tables() == {MATCHES_TABLE, *history.TABLES, *partitions}  # no staging table lingers
            attached = db.rows(
                "select inhrelid::regclass::text from pg_inherits where inhparent = to_regclass(?)", [MATCHES_TABLE]
            )
            assert {table for (table,) in attached} == partitions
    assert np.array_equal(store.read_partition("1")["contact_id"].to_numpy(), old), "the old rows changed"
    assert store.summarize("1") == PartitionSummary(old.size, 1, old.size, 0, 0)
    assert store.read_partition("2")["contact_id"].tolist() == [7]
    new = version_ids(5, 1_000)
    store.replace_partition("1", frame(new))  # and the next replacement works
    assert np.array_equal(store.read_partition("1")["contact_id"].to_numpy(), new)


def test_a_writer_killed_mid_write_leaves_the_old_rows(store_url: str) -> None:
    """SIGKILL while 3,000,000 rows are being written over 1,000,000 (DuckDB: during the insert or at
    the commit; PostgreSQL: during the COPY)."""
    old = version_ids(1, 1_000_000)
    store = open_store(store_url)
    store.replace_partition("1", frame(old))
    store.replace_partition("2", frame([7]))
    writer, name = start_writer(store_url, KILLED_ROWS)
    kill(writer)
    check_left_intact(store_url, old, name)


def test_a_postgres_writer_killed_at_the_swap_leaves_the_old_rows(postgres_store: str) -> None:
    """SIGKILL once the rows are copied, while the swap waits for a reader's lock on segment_matches:
    the reader still sees the old rows, and so does everyone after."""
    old = version_ids(1, 200_000)
    store = open_store(postgres_store)
    store.replace_partition("1", frame(old))
    store.replace_partition("2", frame([7]))
    with database(postgres_store) as reader, reader.connection.transaction():
        count = f"select count(*) from {MATCHES_TABLE} where segment_id = '1'"
        assert reader.value(count) == old.size  # the reader's transaction now holds its lock
        writer, name = start_writer(postgres_store, KILLED_ROWS, "swap")
        with database(postgres_store) as db:
            wait_until(
                lambda: (
                    db.value(
                        "select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid "
                        "where a.application_name = ? and not l.granted and l.relation = to_regclass(?)",
                        [name, MATCHES_TABLE],
                    )
                    == 1
                ),
                "the writer's swap to wait for segment_matches",
            )
        kill(writer)
        assert reader.value(count) == old.size
    check_left_intact(postgres_store, old, name)

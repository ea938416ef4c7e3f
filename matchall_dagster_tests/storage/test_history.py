"""The membership history in DuckDB: exact joined/left sets, append-only steps, idempotence."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest

from matchall_dagster.storage import history

T0 = datetime(2026, 11, 1, 6, tzinfo=UTC)


@pytest.fixture
def connection(tmp_path: Path) -> Iterator[Any]:
    with duckdb.connect(str(tmp_path / "history.duckdb")) as connection:
        connection.execute("create table segment_matches (segment_id varchar, position bigint, contact_id bigint)")
        yield connection


def materialize(connection: Any, segment_id: str, contact_ids: list[int] | np.ndarray[Any, Any]) -> None:
    """What the IO manager does for a partition: replace its rows."""
    ids = np.asarray(contact_ids, dtype=np.int64)
    frame = pd.DataFrame({"segment_id": segment_id, "position": np.arange(1, ids.size + 1), "contact_id": ids})
    connection.register("incoming", frame)
    connection.execute("delete from segment_matches where segment_id = ?", [segment_id])
    connection.execute("insert into segment_matches select * from incoming")
    connection.unregister("incoming")


def changes(connection: Any, segment_id: str, run_id: str) -> tuple[set[int], set[int]]:
    rows = connection.execute(
        "select change, contact_id from segment_membership_changes where segment_id = ? and run_id = ?",
        [segment_id, run_id],
    ).fetchall()
    return {c for kind, c in rows if kind == "joined"}, {c for kind, c in rows if kind == "left"}


def step(connection: Any, segment_id: str, n: int) -> history.Step:
    return history.record_step(
        connection, segment_id, source=f"m{n}", run_id=f"run-{n}", observed_at=T0 + timedelta(days=n)
    )


def test_first_step_records_every_member_as_joined(connection: Any) -> None:
    materialize(connection, "s", [5, 3, 9])
    first = step(connection, "s", 1)
    assert (first.first, first.recorded, first.members, first.joined, first.left) == (True, True, 3, 3, 0)
    assert first.churn_rate == 0.0  # nothing to compare with
    assert changes(connection, "s", "run-1") == ({3, 5, 9}, set())


def test_later_steps_record_exactly_who_joined_and_who_left(connection: Any) -> None:
    materialize(connection, "s", [1, 2, 3, 4])
    step(connection, "s", 1)
    materialize(connection, "s", [3, 4, 5])  # 1 and 2 left, 5 joined; order does not matter
    second = step(connection, "s", 2)
    assert (second.first, second.previous_members, second.members, second.joined, second.left) == (False, 4, 3, 1, 2)
    assert second.churn_rate == pytest.approx(3 / 4)
    assert changes(connection, "s", "run-2") == ({5}, {1, 2})
    materialize(connection, "s", [1, 3, 4, 5])  # 1 came back
    assert changes(connection, "s", "run-3") == (set(), set())
    third = step(connection, "s", 3)
    assert (third.joined, third.left) == (1, 0)
    assert changes(connection, "s", "run-3") == ({1}, set())


def test_recording_the_same_materialization_again_appends_nothing(connection: Any) -> None:
    materialize(connection, "s", [1, 2])
    step(connection, "s", 1)
    materialize(connection, "s", [2, 3])
    step(connection, "s", 2)
    before = connection.execute("select count(*) from segment_membership_changes").fetchone()[0]
    again = step(connection, "s", 2)
    assert not again.recorded
    assert (again.joined, again.left, again.members) == (1, 1, 2)  # the step as first recorded
    assert connection.execute("select count(*) from segment_membership_changes").fetchone()[0] == before
    assert connection.execute("select count(*) from segment_membership_steps").fetchone()[0] == 2


def test_an_unchanged_segment_appends_a_step_and_no_changes(connection: Any) -> None:
    materialize(connection, "s", [7, 8])
    step(connection, "s", 1)
    unchanged = step(connection, "s", 2)
    assert (unchanged.recorded, unchanged.joined, unchanged.left, unchanged.churn_rate) == (True, 0, 0, 0.0)
    assert [row[1] for row in history.steps_since(connection, "s", None)] == ["run-1", "run-2"]


def test_segments_are_independent_and_empty_segments_work(connection: Any) -> None:
    materialize(connection, "a", [1, 2, 3])
    materialize(connection, "b", [])
    step(connection, "a", 1)
    empty = step(connection, "b", 1)
    assert (empty.members, empty.joined, empty.left) == (0, 0, 0)
    materialize(connection, "b", [2])  # the same contact in two segments
    materialize(connection, "a", [])
    assert (step(connection, "b", 2).joined, step(connection, "a", 2).left) == (1, 3)
    assert changes(connection, "b", "run-2") == ({2}, set())
    assert changes(connection, "a", "run-2") == (set(), {1, 2, 3})


class _FailingBeforeTheStepRow:
    """A real connection that fails where the step's own row is written: after the changes and the
    state were, inside the transaction."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def execute(self, query: str, *args: Any) -> Any:
        if query.startswith(f"insert into {history.STEPS_TABLE}"):
            raise duckdb.IOException("disk full")
        return self._connection.execute(query, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def test_a_failed_step_leaves_the_history_as_it_was(connection: Any) -> None:
    materialize(connection, "s", [1, 2])
    step(connection, "s", 1)
    materialize(connection, "s", [2, 3])
    with pytest.raises(duckdb.IOException):
        step(_FailingBeforeTheStepRow(connection), "s", 2)
    counts = [connection.execute(f"select count(*) from {table}").fetchone()[0] for table in history.TABLES]
    assert counts == [2, 1, 2]  # changes, steps, state: the first step's only
    assert changes(connection, "s", "run-2") == (set(), set())
    assert step(connection, "s", 2).joined == 1  # and the step can be recorded again


def test_since_filters_steps_and_changes(connection: Any) -> None:
    for n, ids in enumerate(([1], [1, 2], [2]), start=1):
        materialize(connection, "s", ids)
        step(connection, "s", n)
    since = T0 + timedelta(days=2)
    assert [row[1] for row in history.steps_since(connection, "s", since)] == ["run-2", "run-3"]
    rows = history.changes_since(connection, "s", since).fetchall()
    assert [(change, contact) for _, change, contact, _ in rows] == [("joined", 2), ("left", 1)]
    assert history.has_history(connection, "s")
    assert not history.has_history(connection, "t")


def test_a_large_segment_is_compared_in_duckdb(connection: Any) -> None:
    """200,000 members with 1% churn: exact counts, and the sets agree with numpy's."""
    rng = np.random.default_rng(3)
    before = rng.permutation(400_000)[:200_000].astype(np.int64)
    after = np.concatenate([before[2_000:], np.arange(500_000, 502_000, dtype=np.int64)])
    materialize(connection, "big", before)
    step(connection, "big", 1)
    materialize(connection, "big", rng.permutation(after))
    second = step(connection, "big", 2)
    assert (second.joined, second.left, second.members) == (2_000, 2_000, 200_000)
    joined, left = changes(connection, "big", "run-2")
    assert joined == set(range(500_000, 502_000))
    assert left == set(before[:2_000].tolist())

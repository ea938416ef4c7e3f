"""The membership history, on each engine: exact joined/left sets computed by the database,
append-only steps, one step per materialization, segments apart, and a failed step undone."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matchall_dagster.storage import history
from matchall_dagster.storage.store import MembershipStore, open_store
from matchall_dagster_tests.storage.engines import database, frame

T0 = datetime(2026, 11, 1, 6, tzinfo=UTC)


@pytest.fixture
def store(store_url: str) -> MembershipStore:
    return open_store(store_url)


def materialize(store: MembershipStore, segment_id: str, contact_ids: Sequence[int] | np.ndarray[Any, Any]) -> None:
    """What the IO manager does for a partition: replace its rows."""
    store.replace_partition(segment_id, frame(contact_ids))


def step(store: MembershipStore, segment_id: str, n: int, *, source: str | None = None) -> history.Step:
    return store.record_step(
        segment_id, source=source or f"m{n}", run_id=f"run-{n}", observed_at=T0 + timedelta(days=n)
    )


def all_changes(store: MembershipStore, segment_id: str, since: datetime | None = None) -> pd.DataFrame:
    batches = list(store.changes_since(segment_id, since, 100_000))
    if not batches:
        return pd.DataFrame({"observed_at": [], "change": [], "contact_id": [], "run_id": []})
    return pd.concat(batches, ignore_index=True)


def changes(store: MembershipStore, segment_id: str, run_id: str) -> tuple[set[int], set[int]]:
    """The changes step `run_id` ("run-N", observed on day N) appended."""
    rows = all_changes(store, segment_id, T0 + timedelta(days=int(run_id.removeprefix("run-"))))
    rows = rows[rows["run_id"] == run_id]
    return (
        {int(c) for c in rows.loc[rows["change"] == history.JOINED, "contact_id"]},
        {int(c) for c in rows.loc[rows["change"] == history.LEFT, "contact_id"]},
    )


def counts(store_url: str) -> list[int]:
    """Rows of the changes, steps and state tables."""
    with database(store_url) as db:
        return [int(db.value(f"select count(*) from {table}")) for table in history.TABLES]


def test_the_first_step_records_every_member_as_joined(store: MembershipStore) -> None:
    materialize(store, "s", [5, 3, 9])
    first = step(store, "s", 1)
    assert (first.segment_id, first.run_id, first.observed_at) == ("s", "run-1", T0 + timedelta(days=1))
    assert (first.first, first.recorded, first.previous_members, first.members, first.joined, first.left) == (
        True, True, 0, 3, 3, 0,
    )  # fmt: skip
    assert first.churn_rate == 0.0  # nothing to compare with
    assert changes(store, "s", "run-1") == ({3, 5, 9}, set())


def test_later_steps_record_exactly_who_joined_and_who_left(store: MembershipStore) -> None:
    materialize(store, "s", [1, 2, 3, 4])
    step(store, "s", 1)
    materialize(store, "s", [3, 4, 5])  # 1 and 2 left, 5 joined; order does not matter
    second = step(store, "s", 2)
    assert (second.first, second.previous_members, second.members, second.joined, second.left) == (False, 4, 3, 1, 2)
    assert second.churn_rate == pytest.approx(3 / 4)
    assert changes(store, "s", "run-2") == ({5}, {1, 2})
    materialize(store, "s", [1, 3, 4, 5])  # 1 came back
    assert changes(store, "s", "run-3") == (set(), set())  # not before its step
    third = step(store, "s", 3)
    assert (third.joined, third.left) == (1, 0)
    assert changes(store, "s", "run-3") == ({1}, set())


def test_joined_and_left_are_the_set_differences_on_random_memberships(store: MembershipStore) -> None:
    """Five steps over random memberships of a pool of 20,000 contacts: each step's changes are
    Python's set differences, and the counts of the step agree."""
    rng = np.random.default_rng(11)
    previous: set[int] = set()
    for n in range(1, 6):
        members = rng.permutation(20_000)[: int(rng.integers(2_000, 8_000))]
        materialize(store, "s", members)
        recorded = step(store, "s", n)
        now = {int(c) for c in members}
        assert changes(store, "s", f"run-{n}") == (now - previous, previous - now)
        assert (recorded.previous_members, recorded.members) == (len(previous), len(now))
        assert (recorded.joined, recorded.left) == (len(now - previous), len(previous - now))
        previous = now
    steps = store.steps_since("s", None)
    assert steps is not None
    assert [row[1] for row in steps] == [f"run-{n}" for n in range(1, 6)]


def test_recording_the_same_materialization_again_appends_nothing(store: MembershipStore, store_url: str) -> None:
    materialize(store, "s", [1, 2])
    step(store, "s", 1)
    materialize(store, "s", [2, 3])
    step(store, "s", 2)
    before = counts(store_url)
    materialize(store, "s", [4])  # even with other rows since: the source was already compared
    again = step(store, "s", 2)
    assert not again.recorded
    assert (again.run_id, again.joined, again.left, again.members) == ("run-2", 1, 1, 2)  # as first recorded
    assert counts(store_url) == before
    assert before[1] == 2  # two steps


def test_an_unchanged_segment_appends_a_step_and_no_changes(store: MembershipStore) -> None:
    materialize(store, "s", [7, 8])
    step(store, "s", 1)
    unchanged = step(store, "s", 2)
    assert (unchanged.recorded, unchanged.joined, unchanged.left, unchanged.churn_rate) == (True, 0, 0, 0.0)
    steps = store.steps_since("s", None)
    assert steps is not None
    assert [(run, members, joined, left) for _, run, members, joined, left in steps] == [
        ("run-1", 2, 2, 0),
        ("run-2", 2, 0, 0),
    ]


def test_segments_are_independent_and_empty_segments_work(store: MembershipStore) -> None:
    materialize(store, "a", [1, 2, 3])
    materialize(store, "b", [])
    step(store, "a", 1)
    empty = step(store, "b", 1)
    assert (empty.first, empty.members, empty.joined, empty.left) == (True, 0, 0, 0)
    materialize(store, "b", [2])  # the same contact in two segments
    materialize(store, "a", [])
    assert (step(store, "b", 2).joined, step(store, "a", 2).left) == (1, 3)
    assert changes(store, "b", "run-2") == ({2}, set())
    assert changes(store, "a", "run-2") == (set(), {1, 2, 3})
    assert changes(store, "a", "run-1") == ({1, 2, 3}, set())
    assert changes(store, "b", "run-1") == (set(), set())


def test_a_failed_step_leaves_the_history_as_it_was(
    store: MembershipStore, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step fails where its own row is written: after its changes and the state were, in its transaction."""
    materialize(store, "s", [1, 2])
    step(store, "s", 1)
    materialize(store, "s", [2, 3])
    session = sys.modules[type(store).__module__]._Session  # the engine's `history.Sql`
    change = session.change

    def failing(self: Any, statement: str, params: Sequence[Any] = ()) -> int:
        if statement.startswith(f"insert into {history.STEPS_TABLE}"):
            raise OSError("disk full")
        return int(change(self, statement, params))

    monkeypatch.setattr(session, "change", failing)
    with pytest.raises(OSError, match="disk full"):
        step(store, "s", 2)
    monkeypatch.undo()
    assert counts(store_url) == [2, 1, 2]  # changes, steps, state: the first step's only
    assert changes(store, "s", "run-2") == (set(), set())
    assert step(store, "s", 2).joined == 1  # and the step can be recorded again
    assert changes(store, "s", "run-2") == ({3}, {1})


def test_since_filters_steps_and_changes_and_changes_come_in_batches(store: MembershipStore) -> None:
    materialize(store, "s", [1])
    assert not store.steps_since("s", None)  # no history at all: None (DuckDB) or no steps
    for n, ids in enumerate(([1], [1, 2], [2], [2, 3, 4, 5]), start=1):
        materialize(store, "s", ids)
        step(store, "s", n)
    since = T0 + timedelta(days=2)
    steps = store.steps_since("s", since)
    assert steps is not None
    assert [row[1] for row in steps] == ["run-2", "run-3", "run-4"]
    assert steps[0][0] == since
    rows = pd.concat(store.changes_since("s", since, 100), ignore_index=True)
    assert [(change, int(contact)) for change, contact in zip(rows["change"], rows["contact_id"], strict=True)] == [
        ("joined", 2), ("left", 1), ("joined", 3), ("joined", 4), ("joined", 5),
    ]  # fmt: skip
    assert list(rows.columns) == ["observed_at", "change", "contact_id", "run_id"]
    assert [len(batch) for batch in store.changes_since("s", None, 2)] == [2, 2, 2]  # 6 changes in all
    assert store.steps_since("t", None) == []  # another segment: no steps
    assert all_changes(store, "t").empty


def test_a_large_segment_is_compared_in_the_database(store: MembershipStore) -> None:
    """200,000 members with 1 % churn: exact counts, and the sets agree with numpy's."""
    rng = np.random.default_rng(3)
    before = rng.permutation(400_000)[:200_000].astype(np.int64)
    after = np.concatenate([before[2_000:], np.arange(500_000, 502_000, dtype=np.int64)])
    materialize(store, "big", before)
    step(store, "big", 1)
    materialize(store, "big", rng.permutation(after))
    second = step(store, "big", 2)
    assert (second.joined, second.left, second.members) == (2_000, 2_000, 200_000)
    joined, left = changes(store, "big", "run-2")
    assert joined == set(range(500_000, 502_000))
    assert left == set(before[:2_000].tolist())


@pytest.mark.parametrize("same_source", [False, True], ids=["two-materializations", "one-materialization"])
def test_postgres_steps_of_one_segment_at_once_take_turns(postgres_store: str, same_source: bool) -> None:
    """Two recordings of one segment at once (two sessions): the second compares with the first's
    state, so the changes are appended once, and a materialization is one step however often recorded."""
    store = open_store(postgres_store)
    materialize(store, "s", np.arange(20_000))
    step(store, "s", 1)
    materialize(store, "s", np.arange(10_000, 30_000))
    start = threading.Barrier(2)
    steps: list[history.Step] = []

    def record(n: int) -> None:
        start.wait()
        steps.append(step(open_store(postgres_store), "s", n, source="m2" if same_source else None))

    threads = [threading.Thread(target=record, args=(n,)) for n in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted((s.joined, s.left) for s in steps) == (
        [(10_000, 10_000)] * 2 if same_source else [(0, 0), (10_000, 10_000)]
    )
    assert sorted(s.recorded for s in steps) == ([False, True] if same_source else [True, True])
    rows = all_changes(store, "s")
    assert rows["change"].value_counts().to_dict() == {"joined": 30_000, "left": 10_000}
    assert counts(postgres_store) == [40_000, 3 if not same_source else 2, 20_000]

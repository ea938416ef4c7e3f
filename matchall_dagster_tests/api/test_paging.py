"""The paging protocol without HTTP: a run's pages as one snapshot, restarts, the duplicate count."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from matchall_dagster import InconsistentResultError, MatchAllRun, PageInfo, RunFailedError, RunNotReadyError
from matchall_dagster.api.paging import (
    ContactIds,
    MatchPage,
    ResultSetChangedError,
    count_duplicates,
    iter_snapshot,
    read_with_restarts,
)

START = datetime(2026, 1, 1, tzinfo=UTC)


def _run(page: int, total: int, per_page: int, *, ready: bool = True, **changes: Any) -> MatchAllRun:
    last = -(-total // per_page)
    values: dict[str, Any] = {
        "run_id": "r1",
        "run_id_start": START,
        "is_ready": ready,
        "segment_id": "7",
        "page": PageInfo(current_page=page, last_page=last, per_page=per_page, total=total) if ready else None,
        **changes,
    }
    return MatchAllRun(**values)


class Pages:
    """A run of `total` ids 1..total served `per_page` at a time; `broken` replaces some answers."""

    def __init__(self, total: int, per_page: int, broken: dict[int, MatchAllRun] | None = None) -> None:
        self.total, self.per_page = total, per_page
        self.broken = broken or {}
        self.asked: list[int] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def first(self) -> MatchAllRun:
        ids = list(range(1, min(self.per_page, self.total) + 1))
        return _run(1, self.total, self.per_page).model_copy(update={"matches": ids})

    def __call__(self, page: int, per_page: int) -> tuple[MatchAllRun, ContactIds | None]:
        with self._lock:
            self.asked.append(page)
            self.threads.add(threading.current_thread().name)
        if page in self.broken:
            return self.broken[page], np.empty(0, dtype=np.int64)
        start = (page - 1) * per_page + 1
        ids = np.arange(start, min(start + per_page, self.total + 1), dtype=np.int64)
        return _run(page, self.total, per_page), ids


def _read(pages: Pages, concurrency: int = 4) -> list[MatchPage]:
    return list(iter_snapshot(pages, "7", "r1", pages.first(), concurrency=concurrency))


@pytest.mark.parametrize(("total", "per_page"), [(0, 5), (1, 5), (9, 5), (10, 5), (11, 5), (1_000, 7)])
def test_pages_come_in_order_and_hold_every_id_once(total: int, per_page: int) -> None:
    pages = Pages(total, per_page)
    read = _read(pages)
    assert np.concatenate([page.contact_ids for page in read]).tolist() == list(range(1, total + 1))
    assert all(page.run.matches is None for page in read)  # the ids live in the arrays only
    if total and total % per_page == 0:
        assert max(pages.asked) == total // per_page + 1  # the page past the end proves the total
    else:
        assert max(pages.asked, default=1) == max(1, -(-total // per_page))


def test_pages_are_fetched_on_page_threads_at_most_twice_the_concurrency_ahead() -> None:
    pages = Pages(995, 10)  # not a multiple: no page past the end, asked from this thread
    for consumed, _ in enumerate(iter_snapshot(pages, "7", "r1", pages.first(), concurrency=3)):
        assert len(pages.asked) <= consumed + 2 * 3
    assert all(name.startswith("matchall-page") for name in pages.threads)


def test_a_page_turned_not_ready_is_a_changed_result_set() -> None:
    pages = Pages(30, 10, broken={2: _run(2, 30, 10, ready=False)})
    with pytest.raises(ResultSetChangedError, match=r"Page 2 .* reads as not ready"):
        _read(pages)


@pytest.mark.parametrize(
    ("broken", "fragment"),
    [
        (_run(2, 31, 10), "disagrees with the first page"),
        (_run(2, 30, 10, run_id="r2"), "does not belong to that run"),
        (_run(2, 30, 10, run_id_end=START, is_ready=False), "failed"),
    ],
)
def test_a_page_that_disagrees_with_the_first_ends_the_read(broken: MatchAllRun, fragment: str) -> None:
    error = RunFailedError if "failed" in fragment else InconsistentResultError
    with pytest.raises(error, match=fragment):
        _read(Pages(30, 10, broken={2: broken}))


def test_a_first_page_not_ready_or_inconsistent_is_refused_before_any_request() -> None:
    pages = Pages(30, 10)
    with pytest.raises(RunNotReadyError, match="not ready yet"):
        next(iter_snapshot(pages, "7", "r1", _run(1, 30, 10, ready=False), concurrency=2))
    lying = pages.first().model_copy(update={"page": PageInfo(current_page=1, last_page=9, per_page=10, total=30)})
    with pytest.raises(InconsistentResultError, match="says last_page=9"):
        next(iter_snapshot(pages, "7", "r1", lying, concurrency=2))
    assert pages.asked == []


def test_a_read_restarts_from_the_first_page_after_the_run_changed() -> None:
    attempts: list[Pages] = [Pages(30, 10, broken={3: _run(3, 30, 10, ready=False)}), Pages(30, 10)]
    waits: list[int] = []
    progress: list[tuple[int, int]] = []

    def pages(first: MatchAllRun | None) -> Iterator[MatchPage]:
        source = attempts.pop(0)
        return iter_snapshot(source, "7", "r1", first or source.first(), concurrency=2)

    def wait() -> MatchAllRun:
        waits.append(1)
        return Pages(30, 10).first()

    run, ids, pages_read, restarts = read_with_restarts(
        pages, wait, what="Run 'r1'", first_page=None, max_restarts=3, on_page=lambda *p: progress.append(p)
    )
    assert ids.tolist() == list(range(1, 31))
    assert (pages_read, restarts, len(waits)) == (5, 1, 1)  # 2 pages of the first read, 3 of the second
    assert progress[-1] == (3, 3)
    assert run.page is not None
    assert run.page.total == 30


def test_a_read_gives_up_after_max_restarts() -> None:
    def pages(first: MatchAllRun | None) -> Iterator[MatchPage]:
        source = Pages(30, 10, broken={2: _run(2, 30, 10, ready=False)})
        return iter_snapshot(source, "7", "r1", source.first(), concurrency=2)

    with pytest.raises(ResultSetChangedError, match="Gave up after reading the run 3 times"):
        read_with_restarts(
            pages, lambda: Pages(30, 10).first(), what="Run 'r1'", first_page=None, max_restarts=2, on_page=None
        )


def test_an_id_on_two_pages_is_never_a_list() -> None:
    def pages(first: MatchAllRun | None) -> Iterator[MatchPage]:
        run = Pages(4, 2).first()
        yield MatchPage(run, np.array([1, 2], dtype=np.int64))
        yield MatchPage(_run(2, 4, 2), np.array([2, 3], dtype=np.int64))

    with pytest.raises(InconsistentResultError, match=r"Run 'r1' listed 1 contact id\(s\) more than once"):
        read_with_restarts(pages, Pages(4, 2).first, what="Run 'r1'", first_page=None, max_restarts=0, on_page=None)


# -- the duplicate count --------------------------------------------------------------------------


def _arrays(seed: int) -> list[np.ndarray]:
    """Lists for each path of count_duplicates: monotonic, dense (bitmap), sparse (sorted copy)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for size in (0, 1, 2, 3, 17, 1_000, 70_000):  # 70,000 spans two of its chunks
        dense = rng.integers(1, 2 * size + 2, size)
        sparse = rng.integers(-(2**62), 2**62, size)
        sparse[: size // 3] = sparse[size // 3 : 2 * (size // 3)]  # a third repeated
        increasing = np.cumsum(rng.integers(0, 3, size)) + 5  # gaps of 0 repeat the id before
        arrays += [dense, sparse, increasing, increasing[::-1], np.unique(dense), np.unique(dense)[::-1]]
    return [np.ascontiguousarray(array, dtype=np.int64) for array in arrays]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_count_duplicates_is_exact_on_every_path(seed: int) -> None:
    for ids in _arrays(seed):
        before = ids.copy()
        assert count_duplicates(ids) == ids.size - np.unique(ids).size
        assert np.array_equal(ids, before)  # the list itself is left as it was


def test_count_duplicates_of_extreme_ids() -> None:
    extremes = np.array([2**63 - 1, -(2**63), 0, 2**63 - 1], dtype=np.int64)
    assert count_duplicates(extremes) == 1
    assert count_duplicates(np.array([-(2**63), 2**63 - 1], dtype=np.int64)) == 0
    assert count_duplicates(np.array([7, 7], dtype=np.int64)) == 1

"""The paging protocol: a ready run's pages read as one consistent snapshot.

The first page fixes the layout (`_Layout`: total, per_page, last page) and every later page must
agree with it; pages are fetched concurrently but yielded in order; a read that meets a changed
result-set starts again from the first page, a bounded number of times; the assembled list must
hold no id twice (`count_duplicates`). Requests go through whatever `get_page` the client passes.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from matchall_dagster.api.errors import InconsistentResultError, RunFailedError, RunNotReadyError
from matchall_dagster.api.models import MatchAllRun

__all__ = [
    "ContactIds",
    "MatchList",
    "MatchPage",
    "count_duplicates",
    "iter_snapshot",
    "read_with_restarts",
    "run_failed",
]

log = logging.getLogger(__name__)

ContactIds = npt.NDArray[np.int64]
# (page number, per_page) -> the page's record and its ids (None when the page lacks them).
GetPage = Callable[[int, int], tuple[MatchAllRun, ContactIds | None]]


@dataclass(frozen=True)
class MatchPage:
    """One page of a ready run: the run record (without its id list) and the ids as int64."""

    run: MatchAllRun
    contact_ids: ContactIds


@dataclass(frozen=True)
class MatchList:
    """A segment's complete member list from one ready run, in the run's sort order."""

    segment_id: str
    sort: str
    run: MatchAllRun
    contact_ids: ContactIds
    pages_read: int
    requests: int
    restarts: int
    elapsed_seconds: float

    @property
    def total(self) -> int:
        return int(self.contact_ids.size)


class ResultSetChangedError(RunNotReadyError):
    """The run turned not-ready while its pages were read (its sort was changed elsewhere)."""


def run_failed(segment_id: str, run: MatchAllRun) -> RunFailedError:
    end = run.run_id_end.isoformat() if run.run_id_end else "?"
    return RunFailedError(
        f"Run {run.run_id!r} of segment {segment_id!r} failed: it ended at {end} without becoming "
        f"ready and will never finish. Start a new run; if runs of this segment keep failing, "
        f"tell ActiveCampaign support."
    )


@dataclass(frozen=True)
class _Layout:
    """The paging of a result-set as its first page gave it; every later page must agree."""

    segment_id: str
    run_id: str
    total: int
    per_page: int
    last_page: int

    @classmethod
    def of(cls, segment_id: str, run_id: str, first: MatchAllRun) -> _Layout:
        if first.has_failed:
            raise run_failed(segment_id, first)
        if not first.is_ready:
            raise RunNotReadyError(
                f"Run {run_id!r} of segment {segment_id!r} is not ready yet; wait for it "
                f"(wait_until_ready) before reading its pages."
            )
        if first.page is None or first.matches is None:
            raise InconsistentResultError(
                f"Run {run_id!r} of segment {segment_id!r} reads as ready but its answer has no "
                f"page or matches; the API's answer is incomplete."
            )
        page = first.page
        expected_last = math.ceil(page.total / page.per_page)
        if page.last_page != expected_last and not (page.total == 0 and page.last_page <= 1):
            raise InconsistentResultError(
                f"Run {run_id!r} of segment {segment_id!r} says last_page={page.last_page} for "
                f"total={page.total} at per_page={page.per_page} (expected {expected_last})."
            )
        return cls(segment_id, run_id, page.total, page.per_page, expected_last)

    def accept(self, run: MatchAllRun, ids: ContactIds | None, *, number: int) -> MatchPage:
        """Check one page against the first; `ids` are the page's (else taken from `run.matches`)."""
        where = f"Page {number} of run {self.run_id!r} of segment {self.segment_id!r}"
        if run.has_failed:
            raise run_failed(self.segment_id, run)
        if not run.is_ready:
            raise ResultSetChangedError(
                f"{where} reads as not ready: the run was started again, most likely because "
                f"someone asked for it in another sort order."
            )
        if run.run_id != self.run_id or run.segment_id != self.segment_id:
            raise InconsistentResultError(
                f"{where} does not belong to that run: it names run {run.run_id!r} of segment {run.segment_id!r}."
            )
        if ids is None and run.matches is not None:
            ids = np.fromiter(run.matches, dtype=np.int64, count=len(run.matches))
        if run.page is None or ids is None:
            raise InconsistentResultError(f"{where} lacks its paging or its ids.")
        page = run.page
        expected = min(self.per_page, self.total - (number - 1) * self.per_page) if self.total else 0
        if (page.total, page.per_page, page.current_page) != (self.total, self.per_page, number):
            raise InconsistentResultError(
                f"{where} disagrees with the first page (total {page.total} vs {self.total}, "
                f"per_page {page.per_page} vs {self.per_page}, current_page {page.current_page})."
            )
        if ids.size != expected:
            raise InconsistentResultError(f"{where} holds {ids.size} ids where {expected} were due.")
        return MatchPage(run=run if run.matches is None else run.model_copy(update={"matches": None}), contact_ids=ids)


def iter_snapshot(
    get_page: GetPage, segment_id: str, run_id: str, first: MatchAllRun, *, concurrency: int
) -> Iterator[MatchPage]:
    """Every page of the run from its first, in order, each checked against the first.

    Up to `2 * concurrency` pages are in flight at once; pages not yet consumed are cancelled
    when the reader stops early or a page fails.
    """
    layout = _Layout.of(segment_id, run_id, first)
    yield layout.accept(first, None, number=1)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="matchall-page") as pool:
        pending: deque[tuple[int, Future[tuple[MatchAllRun, ContactIds | None]]]] = deque()
        next_page = 2
        try:
            while next_page <= layout.last_page or pending:
                while next_page <= layout.last_page and len(pending) < 2 * concurrency:
                    pending.append((next_page, pool.submit(get_page, next_page, layout.per_page)))
                    next_page += 1
                number, future = pending.popleft()
                yield layout.accept(*future.result(), number=number)
        finally:
            for _, future in pending:
                future.cancel()
    if layout.total and layout.total % layout.per_page == 0:
        # Pages that fill their total exactly also look like this when the total told is too
        # small, and then nothing else contradicts it: the page after the last must be empty
        # and tell the same total (the API's paginator answers pages past the end so).
        beyond = layout.last_page + 1
        layout.accept(*get_page(beyond, layout.per_page), number=beyond)


def _read_once(
    pages: Iterable[MatchPage], on_page: Callable[[int, int], None], what: str
) -> tuple[MatchAllRun, ContactIds]:
    """The pages assembled into one int64 buffer of the run's total, checked for repeated ids.

    Returns the run as its first page describes it, and the ids.
    """
    ids: ContactIds | None = None
    filled = 0
    record: MatchAllRun | None = None
    for page in pages:
        assert page.run.page is not None
        if ids is None:
            ids = np.empty(page.run.page.total, dtype=np.int64)
            record = page.run
        ids[filled : filled + page.contact_ids.size] = page.contact_ids
        filled += page.contact_ids.size
        on_page(page.run.page.current_page, page.run.page.last_page)
    assert ids is not None
    assert record is not None
    assert filled == ids.size
    duplicates = count_duplicates(ids)
    if duplicates:
        raise InconsistentResultError(
            f"{what} listed {duplicates} contact id(s) more than once across its pages; the list would not be exact."
        )
    return record, ids


@dataclass
class _Progress:
    """Counts the pages read over every attempt, and passes each on to the caller's `on_page`."""

    on_page: Callable[[int, int], None] | None
    pages: int = 0

    def __call__(self, page: int, last_page: int) -> None:
        self.pages += 1
        if self.on_page is not None:
            self.on_page(page, last_page)


def read_with_restarts(
    pages: Callable[[MatchAllRun | None], Iterable[MatchPage]],
    wait_until_ready: Callable[[], MatchAllRun],
    *,
    what: str,
    first_page: MatchAllRun | None,
    max_restarts: int,
    on_page: Callable[[int, int], None] | None,
) -> tuple[MatchAllRun, ContactIds, int, int]:
    """Read the run; when it turns not-ready mid-read or its pages disagree, wait for it and
    read again from the first page, at most `max_restarts` times. Never a mixed or short list.

    Returns the run record, its ids, the pages read (every attempt's) and the restarts taken.
    """
    progress = _Progress(on_page)
    for restart in range(max_restarts + 1):
        try:
            run, ids = _read_once(pages(first_page), progress, what)
        except (ResultSetChangedError, InconsistentResultError) as exc:
            if restart == max_restarts:
                raise type(exc)(
                    f"{exc} Gave up after reading the run {max_restarts + 1} times; "
                    f"try again later, or start a new run."
                ) from exc
            log.warning("%s Reading it again from the first page.", exc)
            first_page = wait_until_ready()
        else:
            return run, ids, progress.pages, restart
    raise AssertionError("unreachable")


_DUPLICATE_CHUNK = 1 << 16  # ids per step of the duplicate count: its temporaries stay at a few hundred KB
_BITMAP_SPAN_PER_ID = 16  # a bitmap of at most 2 bytes an id; sparser ids are sorted instead


def count_duplicates(ids: ContactIds) -> int:
    """How many ids repeat an earlier one (0 when all are distinct), exactly, without a hash set.

    np.unique takes a hash set or a sorted copy: at 10,000,000 ids, seconds and hundreds of MB. A
    strictly monotonic list (sort `id` or `-id`) has none, which one pass in chunks proves; else a
    bitmap over the ids' range (one bit per possible id, for the dense ids of a real account), or
    a sorted copy when the ids are too sparse for a small bitmap.
    """
    size = int(ids.size)
    if size < 2 or _strictly_monotonic(ids):
        return 0
    low, high = int(ids.min()), int(ids.max())
    span = high - low + 1
    if span > _BITMAP_SPAN_PER_ID * size:
        ordered = np.sort(ids)
        repeats = 0
        for start in range(0, size - 1, _DUPLICATE_CHUNK):
            window = ordered[start : start + _DUPLICATE_CHUNK + 1]
            repeats += int(np.count_nonzero(window[1:] == window[:-1]))
        return repeats
    bitmap = np.zeros((span + 63) // 64, dtype=np.uint64)
    for start in range(0, size, _DUPLICATE_CHUNK):
        offsets = (ids[start : start + _DUPLICATE_CHUNK] - low).view(np.uint64)
        np.bitwise_or.at(bitmap, offsets >> np.uint64(6), np.left_shift(np.uint64(1), offsets & np.uint64(63)))
    return size - int(np.bitwise_count(bitmap).sum())


def _strictly_monotonic(ids: ContactIds) -> bool:
    increasing = decreasing = True
    for start in range(0, int(ids.size) - 1, _DUPLICATE_CHUNK):
        window = ids[start : start + _DUPLICATE_CHUNK + 1]
        increasing = increasing and bool(np.all(window[1:] > window[:-1]))
        decreasing = decreasing and bool(np.all(window[1:] < window[:-1]))
        if not (increasing or decreasing):
            return False
    return True

"""The ActiveCampaign Segments Match-All API client: its endpoints (no Dagster import).

Each method checks its input (`validation`), sends through the request gate (`transport`: rate
limit, retries, status to error), and returns the records of `models`; reading a whole run is the
paging protocol of `paging`. Failures raise the errors of `errors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TypeVar
from urllib.parse import quote

import httpx

from matchall_dagster.api.budget import RequestBudget
from matchall_dagster.api.config import (
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_WAIT,
    DEFAULT_PAGE_SIZE,
    DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_TIMEOUT,
    ClientConfig,
)
from matchall_dagster.api.errors import (
    ActiveCampaignError,
    InvalidResponseError,
    RunExpiredError,
    RunNotReadyError,
    SegmentNotFoundError,
)
from matchall_dagster.api.models import (
    MatchAllRun,
    RunState,
    RunStatus,
    Segment,
    parse_page,
    parse_run,
    parse_segments,
)
from matchall_dagster.api.paging import (
    ContactIds,
    MatchList,
    MatchPage,
    count_duplicates,
    iter_snapshot,
    read_with_restarts,
    run_failed,
)
from matchall_dagster.api.transport import RequestGate
from matchall_dagster.api.validation import (
    DEFAULT_SORT,
    validate_api_key,
    validate_api_url,
    validate_id,
    validate_page,
    validate_page_size,
    validate_sort,
)

# MatchList, MatchPage, ContactIds and count_duplicates live in `paging`; importable from here too.
__all__ = ["ActiveCampaignClient", "ContactIds", "MatchList", "MatchPage", "count_duplicates"]

T = TypeVar("T")


class ActiveCampaignClient:
    """A client of one ActiveCampaign account's Match-All API; thread-safe, reuse it.

    The settings are those of `ClientConfig` (bounds and meaning declared there). `budget` is
    the account's request budget to take from (`api.budget.request_budget`): without one, the
    client shares this process's own window of the account at `requests_per_second`; give it one
    in a file or PostgreSQL to share the account's 5/s with other processes. `transport`,
    `sleep` and `clock` are injectable so that tests can run it in-process and without real waiting.
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        budget: RequestBudget | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = validate_api_url(api_url)
        validate_api_key(api_key)
        self.config = ClientConfig.of(
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
            retry_backoff=retry_backoff,
            requests_per_second=requests_per_second,
            page_size=page_size,
            max_concurrent_requests=max_concurrent_requests,
        )
        self.page_size = self.config.page_size
        self.requests_per_second = float(self.config.requests_per_second)
        self.max_concurrent_requests = self.config.max_concurrent_requests
        self._sleep = sleep
        self._clock = clock
        self._gate = RequestGate(
            self.base_url, api_key, self.config, budget=budget, transport=transport, sleep=sleep, clock=clock
        )
        self.budget = self._gate.budget

    def __repr__(self) -> str:
        return f"ActiveCampaignClient(api_url={self.base_url!r}, budget={self.budget!r})"

    def close(self) -> None:
        self._gate.close()

    def __enter__(self) -> ActiveCampaignClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def requests_sent(self) -> int:
        """Every HTTP request this client has sent, retries included."""
        return self._gate.requests_sent

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, segment_id: str, *, sort: str = DEFAULT_SORT) -> MatchAllRun:
        """Start a match-all run without waiting for it (`instant`); returns the new run."""
        segment_id = validate_id(segment_id)
        sort = validate_sort(sort)

        def not_found(_: str) -> ActiveCampaignError:
            return SegmentNotFoundError(
                f"ActiveCampaign has no saved segment {segment_id!r} in this account (404). "
                f"Check the id under Contacts > Segments, or remove it from the tracked segments."
            )

        return self._gate.request(
            f"/api/3/segmentMatchAll/{quote(segment_id, safe='')}",
            # `instant` is a flag: the documents' only value for it is the empty string.
            {"instant": "", "sort": sort, "page": 1, "page_size": self.page_size},
            what=f"starting a run of segment {segment_id!r}",
            parse=parse_run,
            on_not_found=not_found,
        )

    def get_run(
        self,
        segment_id: str,
        run_id: str,
        *,
        sort: str = DEFAULT_SORT,
        page: int = 1,
        page_size: int | None = None,
    ) -> MatchAllRun:
        """One page of a run's result-set (or its status while it is not ready).

        Always pass the sort the run was started with: another sort makes the API throw its
        cache away and search again under the same run id.
        """
        return self._read_run(segment_id, run_id, sort, page, page_size, parse_run)

    def _get_page(
        self, segment_id: str, run_id: str, *, sort: str, page: int, page_size: int
    ) -> tuple[MatchAllRun, ContactIds | None]:
        """`get_run` for the pager: the ids come as an int64 array, never as a list of ints."""
        return self._read_run(segment_id, run_id, sort, page, page_size, parse_page)

    def _read_run(
        self, segment_id: str, run_id: str, sort: str, page: int, page_size: int | None, parse: Callable[[bytes], T]
    ) -> T:
        segment_id = validate_id(segment_id)
        run_id = validate_id(run_id, "run id")
        sort = validate_sort(sort)
        validate_page(page)
        page_size = self.page_size if page_size is None else validate_page_size(page_size)

        def expired(detail: str) -> ActiveCampaignError:
            return RunExpiredError(
                f"Run {run_id!r} of segment {segment_id!r} is gone (404{detail}): runs can be read "
                f"for 90 days after they start, and unknown ids answer the same way. Start a new run."
            )

        return self._gate.request(
            f"/api/3/segmentMatchAll/{quote(segment_id, safe='')}/{quote(run_id, safe='')}",
            {"sort": sort, "page": page, "page_size": page_size},
            what=f"reading page {page} of run {run_id!r} of segment {segment_id!r}",
            parse=parse,
            on_not_found=expired,
        )

    def poll_run(self, segment_id: str, run_id: str, *, sort: str = DEFAULT_SORT) -> RunStatus:
        """The run's state, expired (404) included, without raising for any of them."""
        try:
            run = self.get_run(segment_id, run_id, sort=sort)
        except RunExpiredError:
            return RunStatus(state=RunState.EXPIRED)
        return RunStatus(state=run.state, run=run)

    def wait_until_ready(
        self,
        segment_id: str,
        run_id: str,
        *,
        sort: str = DEFAULT_SORT,
        timeout: float = 3600.0,
        poll_interval: float = 1.0,
        max_poll_interval: float = 15.0,
        on_poll: Callable[[MatchAllRun, float], None] | None = None,
    ) -> MatchAllRun:
        """Poll until the run is ready and return its first page.

        Polls soon after the start, then less often (x1.5 up to `max_poll_interval`). Raises
        `RunFailedError`, `RunExpiredError`, or `RunNotReadyError` after `timeout` seconds.
        """
        started = self._clock()
        interval = poll_interval
        while True:
            run = self.get_run(segment_id, run_id, sort=sort)
            elapsed = self._clock() - started
            if on_poll is not None:
                on_poll(run, elapsed)
            if run.is_ready:
                return run
            if run.has_failed:
                raise run_failed(segment_id, run)
            remaining = timeout - elapsed
            if remaining <= 0:
                raise RunNotReadyError(
                    f"Run {run_id!r} of segment {segment_id!r} was still not ready after {elapsed:.0f} s "
                    f"(started {run.run_id_start.isoformat()}). Large segments can take long: wait "
                    f"longer (raise the timeout) or read the run later by its id."
                )
            self._sleep(min(interval, remaining))
            interval = min(interval * 1.5, max_poll_interval)

    # -- reading a ready run ----------------------------------------------------------------

    def iter_pages(
        self,
        segment_id: str,
        run_id: str,
        *,
        sort: str = DEFAULT_SORT,
        first_page: MatchAllRun | None = None,
    ) -> Iterator[MatchPage]:
        """Every page of a ready run, in order, fetched concurrently in one fixed sort order.

        Each page is checked against the first (same run, same paging, the expected length), so
        that the pages form one snapshot; a page that is not ready any more raises
        `RunNotReadyError` (the run was re-kicked with another sort elsewhere).
        """
        first = first_page if first_page is not None else self.get_run(segment_id, run_id, sort=sort)

        def get_page(page: int, page_size: int) -> tuple[MatchAllRun, ContactIds | None]:
            return self._get_page(segment_id, run_id, sort=sort, page=page, page_size=page_size)

        yield from iter_snapshot(get_page, segment_id, run_id, first, concurrency=self.max_concurrent_requests)

    def fetch_matches(
        self,
        segment_id: str,
        run_id: str,
        *,
        sort: str = DEFAULT_SORT,
        first_page: MatchAllRun | None = None,
        ready_timeout: float = 3600.0,
        max_restarts: int = 3,
        on_page: Callable[[int, int], None] | None = None,
    ) -> MatchList:
        """The complete, ordered member list of a ready run, as one consistent snapshot.

        When the run turns not-ready mid-read, or its pages disagree, waits for it and reads
        again from the first page, at most `max_restarts` times; never returns a mixed or short
        list. `on_page(pages_done, last_page)` reports progress.
        """
        started = self._clock()
        requests_before = self.requests_sent
        run, ids, pages_read, restarts = read_with_restarts(
            lambda first: self.iter_pages(segment_id, run_id, sort=sort, first_page=first),
            partial(self.wait_until_ready, segment_id, run_id, sort=sort, timeout=ready_timeout),
            what=f"Run {run_id!r} of segment {segment_id!r}",
            first_page=first_page,
            max_restarts=max_restarts,
            on_page=on_page,
        )
        return MatchList(
            segment_id=segment_id,
            sort=sort,
            run=run,
            contact_ids=ids,
            pages_read=pages_read,
            requests=self.requests_sent - requests_before,
            restarts=restarts,
            elapsed_seconds=self._clock() - started,
        )

    # -- segments ---------------------------------------------------------------------------

    def list_segments(self, *, page_size: int = 1000) -> list[Segment]:
        """Every saved segment of the account (`GET /api/3/audiences`; a 404 means none).

        Pages are read until one holds fewer than `page_size` items: a page past the end is
        `data: []`. The same segment on two pages (the list changed while it was read) is kept once.
        """
        validate_page_size(page_size)
        segments: dict[str, Segment] = {}
        page = 1
        while True:
            batch = self._gate.request(
                "/api/3/audiences",
                {"page": page, "page_size": page_size},
                what=f"listing segments (page {page})",
                parse=parse_segments,
                on_not_found=lambda _: [],
            )
            for segment in batch:
                segments.setdefault(segment.id, segment)
            if len(batch) < page_size:
                return list(segments.values())
            page += 1

    def get_segment(self, segment_id: str) -> Segment:
        """One saved segment's summary (`GET /api/3/audiences/{segmentId}`)."""
        segment_id = validate_id(segment_id)

        def not_found(_: str) -> ActiveCampaignError:
            return SegmentNotFoundError(
                f"ActiveCampaign has no saved segment {segment_id!r} in this account (404). "
                f"Check the id with `matchall segments`."
            )

        found = self._gate.request(
            f"/api/3/audiences/{quote(segment_id, safe='')}",
            {},
            what=f"reading the summary of segment {segment_id!r}",
            parse=parse_segments,
            on_not_found=not_found,
        )
        match = [segment for segment in found if segment.id == segment_id]
        if not match:
            raise InvalidResponseError(
                f"The summary of segment {segment_id!r} names "
                f"{', '.join(repr(s.id) for s in found) or 'no segment'} in data[].attributes.segment_id."
            )
        return match[0]

"""The ActiveCampaign Segments Match-All API client (no Dagster import).

One `httpx.Client` per client object (keep-alive), every request through one gate: the
client-side rate limit (a sliding-window log from pyrate-limiter, so that no one-second window
ever holds more than the configured requests), a pause shared by all threads when the server
says `Retry-After`, and tenacity's retries with exponential backoff and jitter for the failures
that are worth retrying. Operations return the records of `models`; failures raise `errors`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from typing import TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt
import tenacity
from pyrate_limiter import Limiter, Rate

from matchall_dagster.api.errors import (
    ActiveCampaignError,
    APIUnavailableError,
    AuthenticationError,
    BadRequestError,
    InconsistentResultError,
    InvalidInputError,
    InvalidResponseError,
    RunExpiredError,
    RunFailedError,
    RunNotReadyError,
    SegmentNotFoundError,
    UnexpectedResponseError,
)
from matchall_dagster.api.models import (
    MatchAllRun,
    RunState,
    RunStatus,
    Segment,
    parse_error_details,
    parse_page,
    parse_run,
    parse_segments,
)
from matchall_dagster.api.validation import (
    DEFAULT_SORT,
    MAX_PAGE_SIZE,
    validate_api_url,
    validate_id,
    validate_page,
    validate_page_size,
    validate_sort,
)

__all__ = ["ActiveCampaignClient", "MatchList", "MatchPage"]

log = logging.getLogger(__name__)

T = TypeVar("T")
ContactIds = npt.NDArray[np.int64]

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Requests leave this process a few milliseconds after the limiter admits them (thread hand-off,
# sleep overshoot); widening each window by this much keeps the server's count within the limit.
_WINDOW_GUARD_MS = 15
_MAX_BODY_BYTES = 32 * 1024 * 1024


class _RetryableError(APIUnavailableError):
    """A failure worth another attempt; `retry_after` is the server's wish, in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _InvalidBodyError(_RetryableError, InvalidResponseError):
    pass


class _ResultSetChangedError(RunNotReadyError):
    """The run turned not-ready while its pages were read (its sort was changed elsewhere)."""


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


class ActiveCampaignClient:
    """A client of one ActiveCampaign account's Match-All API; thread-safe, reuse it.

    `transport`, `sleep` and `clock` are injectable so that tests can run it in-process and
    without real waiting.
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 6,
        max_retry_wait: float = 120.0,
        retry_backoff: float = 0.5,
        requests_per_second: float = 5.0,
        page_size: int = MAX_PAGE_SIZE,
        max_concurrent_requests: int = 8,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        base_url = validate_api_url(api_url)
        if not isinstance(api_key, str) or not api_key.strip():
            raise InvalidInputError(
                "The API key is empty. Set ACTIVECAMPAIGN_API_KEY to the key shown in "
                "ActiveCampaign under Settings > Developer."
            )
        if not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
            # Say what is wrong with the key, never what it is.
            raise InvalidInputError(
                "The API key (ACTIVECAMPAIGN_API_KEY) holds spaces, line breaks or non-ASCII characters, so "
                "it cannot be sent as a header; copy it again from Settings > Developer, without surrounding "
                "whitespace."
            )
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise InvalidInputError(f"The request timeout must be a positive number of seconds, not {timeout!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidInputError(f"max_retries must be a whole number of at least 0, not {max_retries!r}.")
        if not (isinstance(requests_per_second, int | float) and 0 < requests_per_second <= 1000):
            raise InvalidInputError(
                f"requests_per_second must be above 0 and at most 1000, not {requests_per_second!r}; "
                f"ActiveCampaign allows 5 per account, shared by every process that uses it."
            )
        if (
            isinstance(max_concurrent_requests, bool)
            or not isinstance(max_concurrent_requests, int)
            or not 1 <= max_concurrent_requests <= 64
        ):
            raise InvalidInputError(f"max_concurrent_requests must be from 1 to 64, not {max_concurrent_requests!r}.")
        self.page_size = validate_page_size(page_size)
        self.requests_per_second = float(requests_per_second)
        self.max_concurrent_requests = max_concurrent_requests
        self._api_key = api_key
        self._timeout = float(timeout)
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        if not (isinstance(retry_backoff, int | float) and retry_backoff >= 0):
            raise InvalidInputError(f"retry_backoff must be a number of seconds of at least 0, not {retry_backoff!r}.")
        # retry_backoff, twice that, four times, ... up to 30 s, each plus up to as much again of
        # jitter so that clients spread out.
        self._backoff_wait = tenacity.wait_exponential_jitter(multiplier=retry_backoff, max=30.0, jitter=retry_backoff)
        self._sleep = sleep
        self._clock = clock
        self._limiter = Limiter(_window_rate(self.requests_per_second), buffer_ms=1)
        self._limiter_queue = _FairLock()
        self._pause_lock = threading.Lock()
        self._paused_until = 0.0
        self._count_lock = threading.Lock()
        self._requests_sent = 0
        self._http = httpx.Client(
            base_url=base_url,
            headers={
                "Api-Token": api_key,
                "Accept": "application/json",
                "User-Agent": f"matchall-dagster/{version('matchall-dagster')}",
            },
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(
                max_connections=max_concurrent_requests, max_keepalive_connections=max_concurrent_requests
            ),
            follow_redirects=False,  # a redirect could carry the token to another host
            transport=transport,
        )
        self.base_url = base_url

    def __repr__(self) -> str:
        return f"ActiveCampaignClient(api_url={self.base_url!r}, requests_per_second={self.requests_per_second})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ActiveCampaignClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def requests_sent(self) -> int:
        """Every HTTP request this client has sent, retries included."""
        return self._requests_sent

    # -- operations -------------------------------------------------------------------------

    def start_run(self, segment_id: str, *, sort: str = DEFAULT_SORT) -> MatchAllRun:
        """Start a match-all run without waiting for it (`instant`); returns the new run."""
        segment_id = validate_id(segment_id)
        sort = validate_sort(sort)

        def not_found(_: str) -> ActiveCampaignError:
            return SegmentNotFoundError(
                f"ActiveCampaign has no saved segment {segment_id!r} in this account (404). "
                f"Check the id under Contacts > Segments, or remove it from the tracked segments."
            )

        return self._request(
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

        return self._request(
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
                raise _run_failed(segment_id, run)
            remaining = timeout - elapsed
            if remaining <= 0:
                raise RunNotReadyError(
                    f"Run {run_id!r} of segment {segment_id!r} was still not ready after {elapsed:.0f} s "
                    f"(started {run.run_id_start.isoformat()}). Large segments can take long: wait "
                    f"longer (raise the timeout) or read the run later by its id."
                )
            self._sleep(min(interval, remaining))
            interval = min(interval * 1.5, max_poll_interval)

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
        layout = _Layout.of(segment_id, run_id, first)
        yield layout.accept(first, None, number=1)
        with ThreadPoolExecutor(self.max_concurrent_requests, thread_name_prefix="matchall-page") as pool:
            pending: deque[tuple[int, Future[tuple[MatchAllRun, ContactIds | None]]]] = deque()
            next_page = 2
            try:
                while next_page <= layout.last_page or pending:
                    while next_page <= layout.last_page and len(pending) < 2 * self.max_concurrent_requests:
                        future = pool.submit(
                            self._get_page, segment_id, run_id, sort=sort, page=next_page, page_size=layout.per_page
                        )
                        pending.append((next_page, future))
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
            after_last = self._get_page(segment_id, run_id, sort=sort, page=beyond, page_size=layout.per_page)
            layout.accept(*after_last, number=beyond)

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
        pages_read = 0
        for restart in range(max_restarts + 1):
            try:
                ids: ContactIds | None = None
                filled = 0
                record: MatchAllRun | None = None  # the run as its first page describes it
                for page in self.iter_pages(segment_id, run_id, sort=sort, first_page=first_page):
                    pages_read += 1
                    assert page.run.page is not None
                    if ids is None:
                        ids = np.empty(page.run.page.total, dtype=np.int64)
                        record = page.run
                    ids[filled : filled + page.contact_ids.size] = page.contact_ids
                    filled += page.contact_ids.size
                    if on_page is not None:
                        on_page(page.run.page.current_page, page.run.page.last_page)
                assert ids is not None
                assert record is not None
                assert filled == ids.size
                duplicates = count_duplicates(ids)
                if duplicates:
                    raise InconsistentResultError(
                        f"Run {run_id!r} of segment {segment_id!r} listed {duplicates} contact id(s) "
                        f"more than once across its pages; the list would not be exact."
                    )
                return MatchList(
                    segment_id=segment_id,
                    sort=sort,
                    run=record,
                    contact_ids=ids,
                    pages_read=pages_read,
                    requests=self.requests_sent - requests_before,
                    restarts=restart,
                    elapsed_seconds=self._clock() - started,
                )
            except (_ResultSetChangedError, InconsistentResultError) as exc:
                if restart == max_restarts:
                    raise type(exc)(
                        f"{exc} Gave up after reading the run {max_restarts + 1} times; "
                        f"try again later, or start a new run."
                    ) from exc
                log.warning("%s Reading it again from the first page.", exc)
                first_page = self.wait_until_ready(segment_id, run_id, sort=sort, timeout=ready_timeout)
        raise AssertionError("unreachable")

    def list_segments(self, *, page_size: int = 1000) -> list[Segment]:
        """Every saved segment of the account (`GET /api/3/audiences`; a 404 means none).

        Pages are read until one holds fewer than `page_size` items: a page past the end is
        `data: []`. The same segment on two pages (the list changed while it was read) is kept once.
        """
        validate_page_size(page_size)
        segments: dict[str, Segment] = {}
        page = 1
        while True:
            batch = self._request(
                "/api/3/audiences",
                {"page": page, "page_size": page_size},
                what=f"listing segments (page {page})",
                parse=parse_segments,
                on_not_found=lambda _: None,
            )
            for segment in batch or ():
                segments.setdefault(segment.id, segment)
            if batch is None or len(batch) < page_size:
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

        found = self._request(
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

    # -- the request gate -------------------------------------------------------------------

    def _request(
        self,
        path: str,
        params: dict[str, str | int],
        *,
        what: str,
        parse: Callable[[bytes], T],
        on_not_found: Callable[[str], ActiveCampaignError | None],
    ) -> T:
        """Send one GET through the gate, retrying what is worth it; parse inside the retry."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_RetryableError),
            stop=tenacity.stop_after_attempt(self._max_retries + 1),
            wait=self._backoff,
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "%s (attempt %d of %d); retrying.",
                state.outcome.exception() if state.outcome else "",
                state.attempt_number,
                self._max_retries + 1,
            ),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    status, body = self._send(path, params, what)
                    if status == 404:
                        error = on_not_found(self._details(body))
                        if error is None:
                            return None  # type: ignore[return-value]  # the caller's 404 means "none"
                        raise error
                    try:
                        return parse(body)
                    except InvalidResponseError as exc:
                        raise _InvalidBodyError(str(exc)) from None
        except _RetryableError as exc:
            error_type = InvalidResponseError if isinstance(exc, _InvalidBodyError) else APIUnavailableError
            raise error_type(
                f"Gave up {what} after {self._max_retries + 1} attempts; the last one: {exc} "
                f"The API is overloaded, rate-limited by another user of the account, or down: "
                f"try again later, or raise max_retries."
            ) from None
        raise AssertionError("unreachable")

    def _backoff(self, state: tenacity.RetryCallState) -> float:
        backoff = self._backoff_wait(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = exc.retry_after if isinstance(exc, _RetryableError) else None
        return min(max(backoff, retry_after or 0.0), self._max_retry_wait)

    def _send(self, path: str, params: dict[str, str | int], what: str) -> tuple[int, bytes]:
        """One attempt: wait for the gate, send, read a bounded body, classify the status."""
        self._wait_for_pause()
        with self._limiter_queue:
            self._limiter.try_acquire("api")
        with self._count_lock:
            self._requests_sent += 1
        try:
            with self._http.stream("GET", path, params=params) as response:
                body = _read_bounded(response, what)
        except httpx.TimeoutException:
            raise _RetryableError(f"{what} timed out after {self._timeout:g} s.") from None
        except httpx.TransportError as exc:
            raise _RetryableError(f"{what} failed on the network ({type(exc).__name__}).") from None
        status = response.status_code
        if 200 <= status < 300 or status == 404:
            return status, body
        if status in RETRYABLE_STATUS:
            retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
            if retry_after is not None:
                self._pause_all(retry_after)
            message = f"{what} answered {status} {response.reason_phrase}{self._details(body)}."
            raise _RetryableError(message, retry_after)
        if status in (401, 403):
            raise AuthenticationError(
                f"ActiveCampaign refused the API token ({status}) while {what}. Check "
                f"ACTIVECAMPAIGN_API_KEY against Settings > Developer of the account at "
                f"{self.base_url}, and that the user owning the key may read segments."
            )
        if status == 402:
            raise ActiveCampaignError(
                f"ActiveCampaign answered 402 Payment Required while {what}: the account's plan or "
                f"billing blocks API use. Settle it in the account, then try again."
            )
        if status == 400:
            raise BadRequestError(f"ActiveCampaign refused the request while {what} (400){self._details(body)}.")
        if 300 <= status < 400:
            target = httpx.URL(response.headers.get("Location", ""))
            raise UnexpectedResponseError(
                f"ActiveCampaign answered {status} with a redirect to host {target.host or '?'!r} while "
                f"{what}; not followed, since it would carry the API token elsewhere. Check that "
                f"ACTIVECAMPAIGN_API_URL is the account's API URL from Settings > Developer."
            )
        raise UnexpectedResponseError(
            f"ActiveCampaign answered an unexpected {status} while {what}{self._details(body)}."
        )

    def _details(self, body: bytes) -> str:
        """The API's own words about an error, short and with the token scrubbed out."""
        parts = []
        for detail in parse_error_details(body)[:3]:
            text = ": ".join(part for part in (detail.title, detail.detail) if part)
            if text:
                parts.append(text.replace(self._api_key, "[redacted]")[:200])  # scrub, then cut
        text = "; ".join(parts)
        return f": {text}" if text else ""

    def _pause_all(self, seconds: float) -> None:
        with self._pause_lock:
            self._paused_until = max(self._paused_until, self._clock() + min(seconds, self._max_retry_wait))

    def _wait_for_pause(self) -> None:
        delay = self._paused_until - self._clock()
        if delay > 0:
            self._sleep(delay)


class _FairLock:
    """A lock granted in arrival order. The limiter's own lock is not fair, and a page thread
    that keeps losing the race for a slot stalls the in-order pipeline behind it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc_info: object) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


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
            raise _run_failed(segment_id, first)
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
            raise _run_failed(self.segment_id, run)
        if not run.is_ready:
            raise _ResultSetChangedError(
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
    if size < 2:
        return 0
    increasing = decreasing = True
    for start in range(0, size - 1, _DUPLICATE_CHUNK):
        window = ids[start : start + _DUPLICATE_CHUNK + 1]
        increasing = increasing and bool(np.all(window[1:] > window[:-1]))
        decreasing = decreasing and bool(np.all(window[1:] < window[:-1]))
        if not (increasing or decreasing):
            break
    if increasing or decreasing:
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


def _run_failed(segment_id: str, run: MatchAllRun) -> RunFailedError:
    end = run.run_id_end.isoformat() if run.run_id_end else "?"
    return RunFailedError(
        f"Run {run.run_id!r} of segment {segment_id!r} failed: it ended at {end} without becoming "
        f"ready and will never finish. Start a new run; if runs of this segment keep failing, "
        f"tell ActiveCampaign support."
    )


def _window_rate(requests_per_second: float) -> Rate:
    """A sliding window that never lets more than the limit into any one second.

    A one-second window holds whole requests, so a fractional limit above 1 rounds down (2.5
    allows 2 in any second); below 1 it spaces single requests (0.5: one every 2 s).
    """
    if requests_per_second >= 1:
        return Rate(math.floor(requests_per_second), 1000 + _WINDOW_GUARD_MS)
    return Rate(1, math.ceil(1000 / requests_per_second) + _WINDOW_GUARD_MS)


def _retry_after_seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date is allowed by RFC 9110 but not used by this API
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _read_bounded(response: httpx.Response, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            raise UnexpectedResponseError(
                f"The API's answer while {what} is larger than {_MAX_BODY_BYTES // 2**20} MiB, far more "
                f"than any page of 10,000 ids; refusing to read it. Check ACTIVECAMPAIGN_API_URL."
            )
        chunks.append(chunk)
    return b"".join(chunks)

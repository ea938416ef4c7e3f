"""The request gate: every request of a client passes here, and only here.

One `httpx.Client` (keep-alive) behind the account's request budget (`budget`: one place per
request, taken by this gate's threads in arrival order, so that no one-second window of the
account ever holds more than its limit), a pause shared by all threads when the server says
`Retry-After`, and
tenacity's retries with exponential backoff and jitter for the failures worth retrying. Statuses
become the errors of `errors` here, at one boundary; bodies are read with a size bound.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import TypeVar

import httpx
import tenacity

from matchall_dagster.api.budget import MEMORY, RequestBudget, request_budget
from matchall_dagster.api.config import ClientConfig
from matchall_dagster.api.errors import (
    ActiveCampaignError,
    APIUnavailableError,
    AuthenticationError,
    BadRequestError,
    InvalidResponseError,
    UnexpectedResponseError,
)
from matchall_dagster.api.models import parse_error_details

__all__ = ["RETRYABLE_STATUS", "RequestGate"]

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BODY_BYTES = 32 * 1024 * 1024


class _RetryableError(APIUnavailableError):
    """A failure worth another attempt; `retry_after` is the server's wish, in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _InvalidBodyError(_RetryableError, InvalidResponseError):
    pass


class RequestGate:
    """Sends GETs to one account's API within the rate limit, retrying what is worth it.

    Thread-safe: the page threads of one client share its gate, its budget and its pauses.
    Without a `budget`, the gate takes from this process's own window of the account (`memory`).
    `transport`, `sleep` and `clock` are injectable for tests.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        config: ClientConfig,
        *,
        budget: RequestBudget | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url
        self.budget = budget or request_budget(MEMORY, base_url, config.requests_per_second)
        self.config = config
        self._api_key = api_key
        self._sleep = sleep
        self._clock = clock
        # retry_backoff, twice that, four times, ... up to 30 s, each plus up to as much again of
        # jitter so that clients spread out.
        backoff = config.retry_backoff
        self._backoff_wait = tenacity.wait_exponential_jitter(multiplier=backoff, max=30.0, jitter=backoff)
        self._budget_queue = FairLock()
        self._pause_lock = threading.Lock()
        self._paused_until = 0.0
        self._count_lock = threading.Lock()
        self._requests_sent = 0
        concurrency = config.max_concurrent_requests
        self.http = httpx.Client(
            base_url=base_url,
            headers={
                "Api-Token": api_key,
                "Accept": "application/json",
                "User-Agent": f"matchall-dagster/{version('matchall-dagster')}",
            },
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            follow_redirects=False,  # a redirect could carry the token to another host
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"RequestGate(base_url={self.base_url!r}, budget={self.budget!r})"

    def close(self) -> None:
        self.http.close()

    @property
    def requests_sent(self) -> int:
        """Every HTTP request sent through this gate, retries included."""
        return self._requests_sent

    def request(
        self,
        path: str,
        params: dict[str, str | int],
        *,
        what: str,
        parse: Callable[[bytes], T],
        on_not_found: Callable[[str], T | ActiveCampaignError],
    ) -> T:
        """Send one GET, retrying what is worth it, and parse inside the retry (a cut body retries).

        A 404 is the caller's to word: `on_not_found(details)` returns the error to raise, or the
        answer that a 404 means (no segments: an empty list).
        """
        attempts = self.config.max_retries + 1
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_RetryableError),
            stop=tenacity.stop_after_attempt(attempts),
            wait=self._backoff,
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "%s (attempt %d of %d); retrying.",
                state.outcome.exception() if state.outcome else "",
                state.attempt_number,
                attempts,
            ),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    status, body = self._send(path, params, what)
                    if status == 404:
                        outcome = on_not_found(self._details(body))
                        if isinstance(outcome, ActiveCampaignError):
                            raise outcome
                        return outcome
                    try:
                        return parse(body)
                    except InvalidResponseError as exc:
                        raise _InvalidBodyError(str(exc)) from None
        except _RetryableError as exc:
            error_type = InvalidResponseError if isinstance(exc, _InvalidBodyError) else APIUnavailableError
            raise error_type(
                f"Gave up {what} after {attempts} attempts; the last one: {exc} "
                f"The API is overloaded, rate-limited by another user of the account, or down: "
                f"try again later, or raise max_retries."
            ) from None
        raise AssertionError("unreachable")

    def _backoff(self, state: tenacity.RetryCallState) -> float:
        backoff = self._backoff_wait(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = exc.retry_after if isinstance(exc, _RetryableError) else None
        return min(max(backoff, retry_after or 0.0), self.config.max_retry_wait)

    def _send(self, path: str, params: dict[str, str | int], what: str) -> tuple[int, bytes]:
        """One attempt: wait for the pause and a place in the budget, send, read a bounded body, classify."""
        self._wait_for_pause()
        with self._budget_queue:
            self.budget.take()
        with self._count_lock:
            self._requests_sent += 1
        try:
            with self.http.stream("GET", path, params=params) as response:
                body = read_bounded(response, what)
        except httpx.TimeoutException:
            raise _RetryableError(f"{what} timed out after {self.config.timeout:g} s.") from None
        except httpx.TransportError as exc:
            raise _RetryableError(f"{what} failed on the network ({type(exc).__name__}).") from None
        status = response.status_code
        if 200 <= status < 300 or status == 404:
            return status, body
        if status in RETRYABLE_STATUS:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if retry_after is not None:
                self._pause_all(retry_after)
            message = f"{what} answered {status} {response.reason_phrase}{self._details(body)}."
            raise _RetryableError(message, retry_after)
        raise self._refusal(response, body, what)

    def _refusal(self, response: httpx.Response, body: bytes, what: str) -> ActiveCampaignError:
        """The error of a status that no retry will change."""
        status = response.status_code
        if status in (401, 403):
            return AuthenticationError(
                f"ActiveCampaign refused the API token ({status}) while {what}. Check "
                f"ACTIVECAMPAIGN_API_KEY against Settings > Developer of the account at "
                f"{self.base_url}, and that the user owning the key may read segments."
            )
        if status == 402:
            return ActiveCampaignError(
                f"ActiveCampaign answered 402 Payment Required while {what}: the account's plan or "
                f"billing blocks API use. Settle it in the account, then try again."
            )
        if status == 400:
            return BadRequestError(f"ActiveCampaign refused the request while {what} (400){self._details(body)}.")
        if 300 <= status < 400:
            target = httpx.URL(response.headers.get("Location", ""))
            return UnexpectedResponseError(
                f"ActiveCampaign answered {status} with a redirect to host {target.host or '?'!r} while "
                f"{what}; not followed, since it would carry the API token elsewhere. Check that "
                f"ACTIVECAMPAIGN_API_URL is the account's API URL from Settings > Developer."
            )
        return UnexpectedResponseError(
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
            self._paused_until = max(self._paused_until, self._clock() + min(seconds, self.config.max_retry_wait))

    def _wait_for_pause(self) -> None:
        delay = self._paused_until - self._clock()
        if delay > 0:
            self._sleep(delay)


class FairLock:
    """A lock granted in arrival order. A plain lock is not fair, and a page thread that keeps
    losing the race for a place stalls the in-order pipeline behind it; one thread of a gate at a
    time waits in the budget, so the others do not poll the shared store."""

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


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After in seconds; an HTTP date is allowed by RFC 9110 but not used by this API."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def read_bounded(response: httpx.Response, what: str) -> bytes:
    """The body, refused past 32 MiB: a hostile or mistaken server cannot fill the memory."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UnexpectedResponseError(
                f"The API's answer while {what} is larger than {MAX_BODY_BYTES // 2**20} MiB, far more "
                f"than any page of 10,000 ids; refusing to read it. Check ACTIVECAMPAIGN_API_URL."
            )
        chunks.append(chunk)
    return b"".join(chunks)

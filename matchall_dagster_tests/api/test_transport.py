"""The request gate on its own: statuses to errors, retries, pauses, the window, bounded bodies."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from matchall_dagster import (
    ActiveCampaignClient,
    ActiveCampaignError,
    APIUnavailableError,
    AuthenticationError,
    BadRequestError,
    ClientConfig,
    InvalidResponseError,
    UnexpectedResponseError,
)
from matchall_dagster.api.budget import window_rate
from matchall_dagster.api.transport import FairLock, RequestGate, retry_after_seconds
from matchall_dagster.simulator import SimulatorServer
from matchall_dagster_tests.conftest import SleepRecorder

TOKEN = "t0ken-s3cret"
Answer = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def gate_of(sleeps: SleepRecorder) -> Iterator[Callable[..., RequestGate]]:
    gates: list[RequestGate] = []

    def build(answer: Answer, **settings: object) -> RequestGate:
        config = ClientConfig.of(**{"requests_per_second": 1000, **settings})
        gate = RequestGate(
            "https://acct.api-us1.com",
            TOKEN,
            config,
            transport=httpx.MockTransport(answer),
            sleep=sleeps,
            clock=sleeps.clock,
        )
        gates.append(gate)
        return gate

    yield build
    for gate in gates:
        gate.close()


def _get(gate: RequestGate, on_not_found: Callable[[str], bytes | ActiveCampaignError] | None = None) -> bytes:
    return gate.request(
        "/api/3/x",
        {"page": 1},
        what="reading x",
        parse=lambda body: body,
        on_not_found=on_not_found or (lambda detail: UnexpectedResponseError(f"404{detail}")),
    )


def test_each_request_carries_the_token_header_and_no_redirect_is_followed(
    gate_of: Callable[..., RequestGate],
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    gate = gate_of(answer)
    assert _get(gate) == b"ok"
    assert seen[0].headers["Api-Token"] == TOKEN
    assert seen[0].headers["User-Agent"].startswith("matchall-dagster/")
    assert not gate.http.follow_redirects
    assert TOKEN not in repr(gate)
    assert gate.requests_sent == 1


@pytest.mark.parametrize(
    ("status", "error", "fragment"),
    [
        (401, AuthenticationError, "refused the API token (401)"),
        (403, AuthenticationError, "refused the API token (403)"),
        (400, BadRequestError, "(400): Bad: sort"),
        (402, ActiveCampaignError, "402 Payment Required"),
        (302, UnexpectedResponseError, "redirect to host 'evil.example'"),
        (418, UnexpectedResponseError, "unexpected 418"),
    ],
)
def test_statuses_no_retry_can_change_are_one_attempt_and_their_own_error(
    gate_of: Callable[..., RequestGate], status: int, error: type[Exception], fragment: str
) -> None:
    body = b'{"errors": [{"title": "Bad", "detail": "sort"}]}'
    gate = gate_of(lambda _: httpx.Response(status, content=body, headers={"Location": "https://evil.example/"}))
    with pytest.raises(error, match=re.escape(fragment)):
        _get(gate)
    assert gate.requests_sent == 1


def test_a_404_is_the_callers_error_or_answer(gate_of: Callable[..., RequestGate]) -> None:
    gate = gate_of(lambda _: httpx.Response(404, content=b'{"errors": [{"title": "No Result found"}]}'))
    with pytest.raises(UnexpectedResponseError, match="404: No Result found"):
        _get(gate)
    assert _get(gate, lambda _: b"none") == b"none"


def test_retryable_statuses_are_retried_then_end_naming_the_last_status(
    gate_of: Callable[..., RequestGate], sleeps: SleepRecorder
) -> None:
    gate = gate_of(lambda _: httpx.Response(503), max_retries=2, retry_backoff=0.5)
    with pytest.raises(APIUnavailableError, match=r"after 3 attempts; the last one: reading x answered 503"):
        _get(gate)
    assert gate.requests_sent == 3
    assert len(sleeps.calls) == 2
    assert all(0.5 <= wait <= 2.0 for wait in sleeps.calls)


def test_a_retry_after_pauses_every_thread_capped_at_max_retry_wait(
    gate_of: Callable[..., RequestGate], sleeps: SleepRecorder
) -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "600"}), httpx.Response(200, content=b"ok")])
    gate = gate_of(lambda _: next(answers), retry_backoff=0, max_retry_wait=7.0)
    assert _get(gate) == b"ok"
    assert sleeps.calls[0] == 7.0  # the backoff, raised to Retry-After, capped


def test_a_body_that_does_not_parse_is_retried_and_ends_as_invalid_response(
    gate_of: Callable[..., RequestGate],
) -> None:
    gate = gate_of(lambda _: httpx.Response(200, content=b"{"), max_retries=1, retry_backoff=0)

    def parse(body: bytes) -> bytes:
        raise InvalidResponseError("cut short")

    with pytest.raises(InvalidResponseError, match="after 2 attempts; the last one: cut short"):
        gate.request("/x", {}, what="x", parse=parse, on_not_found=lambda _: b"")


def test_the_token_echoed_in_an_error_detail_is_scrubbed(gate_of: Callable[..., RequestGate]) -> None:
    body = f'{{"errors": [{{"title": "Bad token {TOKEN}"}}]}}'.encode()
    gate = gate_of(lambda _: httpx.Response(400, content=body))
    with pytest.raises(BadRequestError) as refused:
        _get(gate)
    assert TOKEN not in str(refused.value)
    assert "[redacted]" in str(refused.value)


def test_a_body_past_32_mib_is_refused(gate_of: Callable[..., RequestGate]) -> None:
    chunk = b"0" * 2**20
    gate = gate_of(lambda _: httpx.Response(200, content=iter([chunk] * 40)))
    with pytest.raises(UnexpectedResponseError, match="larger than 32 MiB"):
        _get(gate)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), ("0.5", 0.5), ("-1", None), ("nan", None), ("Wed, 21 Oct 2026", None), (None, None)],
)
def test_retry_after_is_read_as_seconds_only(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


@pytest.mark.parametrize(
    ("rate", "limit", "interval_ms"), [(5, 5, 1015), (2.5, 2, 1015), (0.5, 1, 2015), (1000, 1000, 1015)]
)
def test_the_window_never_holds_more_than_the_limit_in_a_second(rate: float, limit: int, interval_ms: int) -> None:
    window = window_rate(rate)
    assert (window.limit, window.interval) == (limit, interval_ms)


def test_the_fair_lock_is_granted_in_arrival_order() -> None:
    lock = FairLock()
    order: list[int] = []
    threads = []
    with lock:  # hold it while the others queue, one after the other
        for number in range(8):
            thread = threading.Thread(target=lambda n=number: _take(lock, order, n))
            thread.start()
            threads.append(thread)
            time.sleep(0.01)
    for thread in threads:
        thread.join(5)
    assert order == list(range(8))


def _take(lock: FairLock, order: list[int], number: int) -> None:
    with lock:
        order.append(number)


def test_requests_reuse_one_connection(
    server: SimulatorServer, make_client: Callable[..., ActiveCampaignClient]
) -> None:
    client = make_client(server, max_concurrent_requests=1)
    ports = set()
    for _ in range(5):
        with client._gate.http.stream("GET", "/api/3/audiences") as response:
            response.read()
            stream = response.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
    assert len(ports) == 1

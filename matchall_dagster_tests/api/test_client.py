"""The client against the simulator over real HTTP: run states, paging, sorts, faults."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from matchall_dagster import (
    ActiveCampaignClient,
    APIUnavailableError,
    AuthenticationError,
    InconsistentResultError,
    InvalidInputError,
    InvalidResponseError,
    RunExpiredError,
    RunFailedError,
    RunNotReadyError,
    RunState,
    SegmentNotFoundError,
    UnexpectedResponseError,
)
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimAccount, SimSegment, SimulatorServer
from matchall_dagster_tests.conftest import PAGING_SIZES, UUID_SEGMENT, ServeSimulator, SleepRecorder

MakeClient = Callable[..., ActiveCampaignClient]


def fetch(client: ActiveCampaignClient, segment_id: str, sort: str = "id") -> list[int]:
    run = client.start_run(segment_id, sort=sort)
    first = client.wait_until_ready(segment_id, run.run_id, sort=sort)
    ids: list[int] = client.fetch_matches(segment_id, run.run_id, sort=sort, first_page=first).contact_ids.tolist()
    return ids


@pytest.mark.parametrize("segment_id", [*[str(size) for size in PAGING_SIZES.values() if size], "100", UUID_SEGMENT])
def test_fetch_across_page_boundaries_equals_ground_truth(
    server: SimulatorServer, make_client: MakeClient, segment_id: str
) -> None:
    client = make_client(server)
    assert fetch(client, segment_id) == server.simulator.truth(segment_id)


@pytest.mark.parametrize(("page_size", "segment_id"), [(10_000, "25001"), (2_500, "25001"), (1, "1"), (3, "100")])
def test_pages_are_read_in_order_at_any_page_size(
    server: SimulatorServer, make_client: MakeClient, page_size: int, segment_id: str
) -> None:
    client = make_client(server, page_size=page_size)
    run = client.start_run(segment_id)
    first = client.wait_until_ready(segment_id, run.run_id)
    matches = client.fetch_matches(segment_id, run.run_id, first_page=first)
    assert matches.contact_ids.tolist() == server.simulator.truth(segment_id)
    assert matches.pages_read == max(1, -(-matches.total // page_size))
    assert matches.contact_ids.dtype == np.int64


@pytest.mark.parametrize("sort", ["id", "-id", "email", "-phone", "score2", "last_name,-first_name", "-field9,cdate"])
def test_every_sort_returns_the_simulators_order(
    client: ActiveCampaignClient, server: SimulatorServer, sort: str
) -> None:
    ids = fetch(client, "10001", sort)
    assert ids == server.simulator.truth("10001", sort)
    assert sorted(ids) == server.simulator.truth("10001")


def test_run_states_running_ready_failed_expired(serve_simulator: ServeSimulator, make_client: MakeClient) -> None:
    server = serve_simulator(ready_after=3_600.0)
    client = make_client(server)
    running = client.start_run("1")
    assert running.state is RunState.RUNNING
    assert running.matches is None
    server.simulator.advance_clock(3_601)
    ready = client.poll_run("1", running.run_id)
    assert ready.state is RunState.READY
    assert ready.run is not None
    assert ready.run.page is not None
    assert ready.run.page.total == 1

    failing = client.start_run("77")
    server.simulator.advance_clock(3_601)
    status = client.poll_run("77", failing.run_id)
    assert status.state is RunState.FAILED
    assert status.run is not None
    assert status.run.run_id_end is not None
    with pytest.raises(RunFailedError, match="Start a new run"):
        client.wait_until_ready("77", failing.run_id)

    server.simulator.advance_clock(90 * 86_400)  # past the 90 days a run can be read
    assert client.poll_run("1", running.run_id).state is RunState.EXPIRED
    with pytest.raises(RunExpiredError, match="90 days"):
        client.get_run("1", running.run_id)


def test_unknown_run_and_segment(client: ActiveCampaignClient) -> None:
    with pytest.raises(RunExpiredError):
        client.get_run("1", "744390a5-208e-4c3d-b709-b3c3ea6e5948")
    with pytest.raises(SegmentNotFoundError, match="no saved segment '404404'"):
        client.start_run("404404")


def test_wait_gives_up_after_its_timeout(
    server: SimulatorServer, make_client: MakeClient, sleeps: SleepRecorder
) -> None:
    client = make_client(server, clock=sleeps.clock)
    run = client.start_run("99")
    with pytest.raises(RunNotReadyError, match="still not ready after 60 s"):
        client.wait_until_ready("99", run.run_id, timeout=60, poll_interval=1, max_poll_interval=8)
    assert sleeps.calls[:4] == [1, 1.5, 2.25, 3.375]  # soon after the start, then less often
    assert max(sleeps.calls) == 8


def test_sort_change_mid_read_restarts_from_the_first_page(
    serve_simulator: ServeSimulator, make_client: MakeClient
) -> None:
    server = serve_simulator(ready_after=30.0)
    # Waiting moves the simulator's clock instead of the test's.
    client = make_client(server, page_size=1_000, max_concurrent_requests=1, sleep=server.simulator.advance_clock)
    run = client.start_run("25001", sort="email")
    first = client.wait_until_ready("25001", run.run_id, sort="email")
    other = make_client(server)
    seen = []

    def rekick_once(done: int, last: int) -> None:
        seen.append(done)
        if len(seen) == 3:  # someone else asks the same run for another sort, then back
            other.get_run("25001", run.run_id, sort="-email")
            other.get_run("25001", run.run_id, sort="email")

    matches = client.fetch_matches("25001", run.run_id, sort="email", first_page=first, on_page=rekick_once)
    assert matches.restarts == 1
    assert matches.contact_ids.tolist() == server.simulator.truth("25001", "email")


def test_retries_429_honouring_retry_after(
    serve_simulator: ServeSimulator, make_client: MakeClient, sleeps: SleepRecorder
) -> None:
    server = serve_simulator(faults=Faults(burst_429_rate=1.0, burst_429_length=2))
    server.simulator.set_faults(Faults(burst_429_rate=0.0))
    server.simulator._burst_left = 2  # the next two requests are answered 429 with Retry-After: 1
    client = make_client(server, clock=sleeps.clock)
    assert client.list_segments()
    assert server.simulator.stats()["by_status"] == {429: 2, 200: 1}
    assert len(sleeps.calls) == 2
    assert all(seconds >= 1.0 for seconds in sleeps.calls)


def test_account_limit_answers_429_and_the_client_waits_it_out(
    serve_simulator: ServeSimulator, make_client: MakeClient
) -> None:
    server = serve_simulator(requests_per_second=2, retry_after=1)
    greedy = make_client(server, requests_per_second=50, sleep=__import__("time").sleep)
    assert fetch(greedy, "25001") == server.simulator.truth("25001")
    assert server.simulator.stats()["by_status"].get(429, 0) >= 1


@pytest.mark.parametrize(
    "faults",
    [
        Faults(error_rate=0.3),
        Faults(truncate_rate=0.3),
        Faults(reset_rate=0.3),
        Faults(error_rate=0.1, truncate_rate=0.1, reset_rate=0.1, burst_429_rate=0.05),
    ],
    ids=["5xx", "truncated", "reset", "mixed"],
)
def test_transient_faults_are_retried_to_an_exact_list(
    serve_simulator: ServeSimulator, make_client: MakeClient, faults: Faults
) -> None:
    server = serve_simulator(faults=faults, seed=3)
    client = make_client(server, max_retries=12, page_size=2_000)
    assert fetch(client, "25001", "last_name") == server.simulator.truth("25001", "last_name")
    assert sum(server.simulator.stats()["faults_injected"].values()) > 0


def test_time_outs_are_retried(serve_simulator: ServeSimulator, make_client: MakeClient) -> None:
    server = serve_simulator(faults=Faults(slow_rate=0.5, slow_ms=700), seed=1)
    client = make_client(server, timeout=0.3, max_retries=15)
    assert fetch(client, "10001") == server.simulator.truth("10001")
    assert server.simulator.stats()["faults_injected"]["slow"] > 0


def test_retry_budget_exhausted_names_the_status(serve_simulator: ServeSimulator, make_client: MakeClient) -> None:
    server = serve_simulator(faults=Faults(error_rate=1.0))
    client = make_client(server, max_retries=2)
    with pytest.raises(APIUnavailableError, match=r"after 3 attempts; the last one: .* answered 50[0234]"):
        client.start_run("1")
    assert server.simulator.stats()["requests"] == 3


def test_truncated_bodies_that_never_heal_raise_invalid_response(
    serve_simulator: ServeSimulator, make_client: MakeClient
) -> None:
    server = serve_simulator(faults=Faults(truncate_rate=1.0))
    with pytest.raises(InvalidResponseError, match="not what the contract promises"):
        make_client(server, max_retries=1).start_run("1")


def test_bad_token_fails_at_once_without_retries_or_the_token(server: SimulatorServer, make_client: MakeClient) -> None:
    token = "sekrit-token-0123456789"
    client = make_client(server, api_key=token)
    with pytest.raises(AuthenticationError, match="ACTIVECAMPAIGN_API_KEY") as caught:
        client.start_run("1")
    assert server.simulator.stats()["requests"] == 1
    assert token not in str(caught.value)
    assert token not in repr(client)


@pytest.mark.parametrize(
    "segment_id",
    ["", "a/b", "..", "1/../2", "%2F", "a?b", "a#b", "a\x00b", "a\nb", "\uff11\uff12", "\u0430bc", "x" * 10_000, " 1"],
)
def test_hostile_ids_are_refused_before_any_request(
    server: SimulatorServer, client: ActiveCampaignClient, segment_id: str
) -> None:
    with pytest.raises(InvalidInputError):
        client.start_run(segment_id)
    with pytest.raises(InvalidInputError):
        client.get_run("1", segment_id)
    assert server.simulator.stats()["requests"] == 0


@pytest.mark.parametrize("sort", ["", "name", "id,", "id,id", "-", "--id", "email desc", "score-2", "field", "ID"])
def test_bad_sorts_are_refused_before_any_request(
    server: SimulatorServer, client: ActiveCampaignClient, sort: str
) -> None:
    with pytest.raises(InvalidInputError, match="sort"):
        client.start_run("1", sort=sort)
    assert server.simulator.stats()["requests"] == 0


@pytest.mark.parametrize("page_size", [0, -1, 10_001, True, 2.5])
def test_bad_page_sizes_are_refused(server: SimulatorServer, page_size: object) -> None:
    with pytest.raises(InvalidInputError, match="page size"):
        ActiveCampaignClient(server.url, "t", page_size=page_size)  # type: ignore[arg-type]


def test_redirects_are_not_followed() -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "https://elsewhere.example/steal"})

    with (
        ActiveCampaignClient("https://acct.api-us1.com", "t0ken", transport=httpx.MockTransport(redirect)) as client,
        pytest.raises(UnexpectedResponseError, match=r"redirect to host 'elsewhere.example'.*not followed"),
    ):
        client.list_segments()


def test_the_api_token_is_sent_in_its_header_and_error_echoes_are_scrubbed() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        token = request.headers["Api-Token"]
        return httpx.Response(400, json={"errors": [{"title": "Bad", "detail": f"header Api-Token: {token}"}]})

    with (
        ActiveCampaignClient("https://acct.api-us1.com", "t0ken-XYZ", transport=httpx.MockTransport(echo)) as client,
        pytest.raises(Exception, match=r"header Api-Token: \[redacted\]") as caught,
    ):
        client.start_run("1")
    assert "t0ken-XYZ" not in str(caught.value)


def test_list_segments_reads_pages_until_a_short_one(serve_simulator: ServeSimulator, make_client: MakeClient) -> None:
    many = SimAccount([SimSegment(str(i), f"Segment {i}", i) for i in range(1, 2_501)])
    server = serve_simulator(many)
    client = make_client(server)
    listed = client.list_segments(page_size=1_000)
    assert sorted(s.id for s in listed) == sorted(s.id for s in many.segments)  # in the API's order, once each
    assert server.simulator.stats()["requests"] == 3  # 1,000 + 1,000 + 500: the short page ends it
    server.simulator.reset_stats()
    assert len(client.list_segments(page_size=500)) == 2_500
    assert server.simulator.stats()["requests"] == 6  # five full pages, then a page past the end: data: []


def test_list_segments_treats_404_as_no_segments(serve_simulator: ServeSimulator, make_client: MakeClient) -> None:
    assert make_client(serve_simulator(SimAccount([]))).list_segments() == []


def test_listed_segments_carry_the_latest_run_of_their_summary(
    server: SimulatorServer, client: ActiveCampaignClient
) -> None:
    run = client.start_run("10001")
    client.wait_until_ready("10001", run.run_id)
    (listed,) = [segment for segment in client.list_segments() if segment.id == "10001"]
    assert listed == client.get_segment("10001")
    assert listed.name == "10001"
    assert listed.last_total == 10_001
    assert listed.last_run is not None
    assert listed.last_run.run_id == run.run_id
    assert listed.last_run.run_id_start == run.run_id_start
    assert listed.created_date is not None
    assert listed.updated_date is not None
    assert listed.created_date <= listed.updated_date


def _listing(pages: dict[int, bytes], seen: list[httpx.Request]) -> ActiveCampaignClient:
    """A client whose `GET /api/3/audiences` answers `pages` by page number (404 for others)."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = pages.get(int(request.url.params["page"]))
        return httpx.Response(404 if body is None else 200, content=body or b"")

    return ActiveCampaignClient(
        "https://acct.api-us1.com", "t0ken", transport=httpx.MockTransport(answer), max_retries=1, retry_backoff=0
    )


def _page(*segment_ids: str) -> bytes:
    items = [{"id": f"9{i}", "type": "audience", "attributes": {"segment_id": i, "name": i}} for i in segment_ids]
    return json.dumps({"data": items}).encode()


def test_a_segment_on_two_pages_is_listed_once(sleeps: SleepRecorder) -> None:
    seen: list[httpx.Request] = []
    with _listing({1: _page("a", "b"), 2: _page("b", "c"), 3: _page()}, seen) as client:
        assert [segment.id for segment in client.list_segments(page_size=2)] == ["a", "b", "c"]
    assert [(r.url.params["page"], r.url.params["page_size"]) for r in seen] == [("1", "2"), ("2", "2"), ("3", "2")]


def test_a_404_after_the_first_page_ends_the_list(sleeps: SleepRecorder) -> None:
    with _listing({1: _page("a", "b")}, []) as client:
        assert [segment.id for segment in client.list_segments(page_size=2)] == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"data": [{"id": "1", "attributes": {"name": "x"}}]}', "data.0.attributes.segment_id"),
        (b'{"data": [{"id": "1", "type": "audience"}]}', "data.0.attributes"),
        (b'{"audiences": [{"id": "1", "name": "x"}], "meta": {"total": "1"}}', "data"),
        (
            b'{"data": [{"attributes": {"segment_id": "1", "counts": {"last_total": {"count": 1.5}}}}]}',
            "data.0.attributes.counts.last_total.count",
        ),
    ],
)
def test_a_list_the_contract_does_not_promise_names_the_bad_field(body: bytes, field: str) -> None:
    with _listing({1: body}, []) as client, pytest.raises(InvalidResponseError, match=rf"\({re.escape(field)}: "):
        client.list_segments()


def test_get_segment_reads_one_summary_and_404_is_segment_not_found(client: ActiveCampaignClient) -> None:
    segment = client.get_segment(UUID_SEGMENT)
    assert segment.id == UUID_SEGMENT
    assert segment.name == "UUID id"
    with pytest.raises(SegmentNotFoundError, match="no saved segment '404404'"):
        client.get_segment("404404")


def test_a_summary_of_another_segment_is_refused() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_page("2"))

    with (
        ActiveCampaignClient("https://acct.api-us1.com", "t0ken", transport=httpx.MockTransport(answer)) as client,
        pytest.raises(InvalidResponseError, match=r"names '2' in data\[\]\.attributes\.segment_id"),
    ):
        client.get_segment("1")


def test_start_run_sends_instant_as_the_documents_empty_flag(server: SimulatorServer) -> None:
    seen: list[httpx.Request] = []
    upstream = httpx.Client(base_url=server.url)

    def forward(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = upstream.get(request.url.raw_path.decode(), headers={"Api-Token": request.headers["Api-Token"]})
        return httpx.Response(answer.status_code, content=answer.content)

    with (
        upstream,
        ActiveCampaignClient(
            "https://acct.api-us1.com", DEFAULT_TOKEN, transport=httpx.MockTransport(forward)
        ) as client,
    ):
        run = client.start_run("1")
    assert run.state is RunState.READY or run.state is RunState.RUNNING
    (request,) = seen
    assert b"instant=&" in request.url.query  # present, with no value: the documents' enum is [""]
    assert request.url.params["instant"] == ""


@pytest.mark.parametrize("indent", [None, 1])
def test_pages_read_the_same_whether_compact_or_spaced(server: SimulatorServer, indent: int | None) -> None:
    """However the JSON is spaced, the parser reads the same pages."""
    upstream = httpx.Client(base_url=server.url)

    def reformat(request: httpx.Request) -> httpx.Response:
        answer = upstream.get(request.url.raw_path.decode(), headers={"Api-Token": request.headers["Api-Token"]})
        separators = (",", ":") if indent is None else (", ", ": ")
        body = json.dumps(answer.json(), indent=indent, separators=separators).encode()
        return httpx.Response(answer.status_code, content=body, headers={"Content-Type": "application/json"})

    with (
        upstream,
        ActiveCampaignClient(
            "https://acct.api-us1.com", DEFAULT_TOKEN, page_size=4_999, transport=httpx.MockTransport(reformat)
        ) as client,
    ):
        ids = fetch(client, "25001", sort="-email")
    assert ids == server.simulator.truth("25001", "-email")


# -- the duplicate check --------------------------------------------------------------------------


def test_an_id_repeated_across_pages_is_never_returned(
    serve_simulator: ServeSimulator, make_client: MakeClient
) -> None:
    server = serve_simulator(faults=Faults(duplicate_rate=1.0))  # every page repeats an id of another page
    client = make_client(server)
    with pytest.raises(InconsistentResultError, match=r"listed \d+ contact id\(s\) more than once"):
        fetch(client, "25001", sort="-email")

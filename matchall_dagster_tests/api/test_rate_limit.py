"""The client against the account limit: never over it in any one-second window, yet busy.

With 400 ms of latency a one-request-at-a-time loop reaches 2.5 requests/s, half the limit; the
concurrent pager must use nearly all of it. The 1,000,000-member measurement is marked `slow`:
`pytest -m slow -s matchall_dagster_tests/api/test_rate_limit.py` prints its figures.
"""

from __future__ import annotations

import time

import pytest

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults
from matchall_dagster_tests.conftest import ServeSimulator


def measure(
    serve_simulator: ServeSimulator, segment_id: str, *, requests_per_second: float, page_size: int = 10_000
) -> dict[str, float]:
    server = serve_simulator(requests_per_second=requests_per_second, faults=Faults(latency_ms=400))
    with ActiveCampaignClient(
        server.url, DEFAULT_TOKEN, requests_per_second=requests_per_second, page_size=page_size
    ) as client:
        run = client.start_run(segment_id)
        first = client.wait_until_ready(segment_id, run.run_id)
        server.simulator.account.ordered(segment_id)  # build the truth before the clock starts
        time.sleep(1.1)  # let the kick-off's requests leave the limiter's window
        server.simulator.reset_stats()
        started = time.monotonic()
        matches = client.fetch_matches(segment_id, run.run_id, first_page=first)
        elapsed = time.monotonic() - started
    stats = server.simulator.stats()
    assert matches.contact_ids.tolist() == server.simulator.truth(segment_id)
    requests = stats["requests"]
    figures = {
        "pages": matches.pages_read,
        "requests": requests,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(requests / elapsed, 3),
        "share_of_limit": round(requests / elapsed / requests_per_second, 3),
        "max_in_any_second": stats["max_requests_in_any_second"],
        "http_429": stats["by_status"].get(429, 0),
    }
    print(f"\n{segment_id} members at {requests_per_second}/s with 400 ms latency: {figures}")
    return figures


def test_never_over_the_limit_and_keeps_the_line_busy(serve_simulator: ServeSimulator) -> None:
    figures = measure(serve_simulator, "500000", requests_per_second=5)
    assert figures["max_in_any_second"] <= 5
    assert figures["http_429"] == 0
    # A sequential loop would be at 0.5 of the limit here; 0.9 leaves room for a noisy machine.
    assert figures["share_of_limit"] >= 0.9


def test_fractional_limits_round_down_to_whole_requests_a_second(serve_simulator: ServeSimulator) -> None:
    figures = measure(serve_simulator, "25001", requests_per_second=2.5, page_size=2_500)
    assert figures["requests"] == 10
    assert figures["max_in_any_second"] == 2
    assert figures["http_429"] == 0


@pytest.mark.slow
def test_one_million_members_at_95_percent_of_the_limit(serve_simulator: ServeSimulator) -> None:
    figures = measure(serve_simulator, "1000000", requests_per_second=5)
    # page 1 came with the readiness poll; the 100 pages fill their total exactly, so one more
    # request makes sure the page after the last is empty
    assert (figures["pages"], figures["requests"]) == (100, 100)
    assert figures["max_in_any_second"] <= 5
    assert figures["share_of_limit"] >= 0.95

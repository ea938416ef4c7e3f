"""The simulator itself, over real HTTP on 127.0.0.1: the behaviours API.md describes, the
parameter rules of the published documents, the account limit, faults, determinism and cost.

Its conformance to the documents' shapes (schemathesis, jsonschema) is test_contract.py's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from starlette.responses import JSONResponse

from matchall_dagster import cli, contract
from matchall_dagster.simulator import (
    DEFAULT_TOKEN,
    Behavior,
    Faults,
    SimAccount,
    SimSegment,
    Simulator,
    SimulatorConfig,
    SimulatorServer,
)
from matchall_dagster.simulator import server as simulator_server
from matchall_dagster.simulator.account import sort_keys
from matchall_dagster.simulator.app import Answer
from matchall_dagster_tests.conftest import UUID_SEGMENT, ServeSimulator, make_account

AUTH = {"Api-Token": DEFAULT_TOKEN}
RESULT_SET = "/api/3/segmentMatchAll/{segmentId}/{runId}"
DAY = 86_400.0


# -- helpers ----------------------------------------------------------------------------------


def get(
    server: SimulatorServer,
    path: str,
    query: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> httpx.Response:
    """One GET on its own connection; `headers=None` sends the right token."""
    params = (query or {}) | params
    return httpx.get(f"{server.url}{path}", params=params, headers=AUTH if headers is None else headers, timeout=10)


def attributes_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1
    assert data[0]["type"] == "matchAll"
    attributes: dict[str, Any] = data[0]["attributes"]
    assert data[0]["id"] == f"{attributes['run_id']}-{attributes.get('page', {}).get('current_page', 1)}"
    return attributes


def start(server: SimulatorServer, segment_id: str, **params: Any) -> dict[str, Any]:
    return attributes_of(get(server, f"/api/3/segmentMatchAll/{segment_id}", **params))


def read(server: SimulatorServer, segment_id: str, run_id: str, **params: Any) -> dict[str, Any]:
    return attributes_of(get(server, f"/api/3/segmentMatchAll/{segment_id}/{run_id}", **params))


def when(timestamp: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp), timestamp
    return datetime.fromisoformat(timestamp)


def error_of(response: httpx.Response, status: int, label: str | None = None) -> dict[str, Any]:
    """The API's error body as ErrorDetailDO publishes it: {"errors": [{"status", "code", "detail", "source"?}]}
    (no `title`: the companion document's closed form has none)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == 1
    error: dict[str, Any] = errors[0]
    assert error["status"] == (label or str(status))
    assert {"detail", "code"} <= error.keys() <= {"status", "detail", "code", "source"}
    return error


# -- 1. one server for many tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[SimulatorServer]:
    """One server for the tests that neither move its clock nor count its requests (each server
    costs ~0.2 s to stop)."""
    server = SimulatorServer(Simulator(make_account(), SimulatorConfig(requests_per_second=0, ready_after=0))).start()
    yield server
    server.stop()


# -- 2. behaviour: run states ---------------------------------------------------------------------


def test_a_run_becomes_ready_after_ready_after(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(ready_after=30.0)
    started = start(server, "25001", instant="")
    run_id = started["run_id"]
    assert uuid.UUID(run_id).version == 4
    assert started["segment_id"] == "25001"
    assert started["is_ready"] is False
    assert not {"run_id_end", "matches", "page"} & started.keys()
    when(started["segment_timestamp"])

    server.simulator.advance_clock(29)
    assert read(server, "25001", run_id)["is_ready"] is False
    server.simulator.advance_clock(2)
    ready = read(server, "25001", run_id, page=3, page_size=1_000)
    assert ready["is_ready"] is True
    assert ready["run_id_start"] == started["run_id_start"]
    assert when(ready["run_id_end"]) - when(ready["run_id_start"]) == timedelta(seconds=30)
    assert ready["matches"] == server.simulator.truth("25001")[2_000:3_000]
    assert ready["page"] == {"current_page": 3, "last_page": 26, "per_page": 1_000, "total": 25_001}
    last = read(server, "25001", run_id, page=26, page_size=1_000)
    assert last["matches"] == server.simulator.truth("25001")[25_000:]
    assert read(server, "25001", run_id, page=27, page_size=1_000)["matches"] == []


def test_page_and_page_size_read_like_the_apis_paginator(shared: SimulatorServer) -> None:
    server = shared
    run_id = start(server, "25001")["run_id"]
    for page, page_size, expected in [
        (0, 5, (1, 5)),
        (-3, 5, (1, 5)),
        (2, 0, (2, 20)),
        (2, -7, (2, 20)),
        (4, 10_000, (4, 10_000)),
    ]:
        attributes = read(server, "25001", run_id, page=page, page_size=page_size)
        current, size = expected
        assert (attributes["page"]["current_page"], attributes["page"]["per_page"]) == expected
        assert attributes["matches"] == server.simulator.truth("25001")[(current - 1) * size : current * size]


def test_a_failing_segments_runs_end_without_becoming_ready(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(ready_after=30.0)
    run_id = start(server, "77", instant="")["run_id"]
    still_running = read(server, "77", run_id)
    assert still_running["is_ready"] is False
    assert "run_id_end" not in still_running
    server.simulator.advance_clock(31)
    for _ in range(2):  # and it never finishes
        failed = read(server, "77", run_id)
        assert failed["is_ready"] is False
        assert not {"matches", "page"} & failed.keys()
        assert when(failed["run_id_end"]) - when(failed["run_id_start"]) == timedelta(seconds=30)
        server.simulator.advance_clock(DAY)


def test_runs_can_be_read_for_90_days(server: SimulatorServer) -> None:
    run_id = start(server, "1")["run_id"]
    server.simulator.advance_clock(90 * DAY - 60)
    assert read(server, "1", run_id)["is_ready"] is True
    assert get(server, f"/api/3/segmentMatchSome/1/{run_id}").status_code == 200
    server.simulator.advance_clock(61)
    for path in (f"/api/3/segmentMatchAll/1/{run_id}", f"/api/3/segmentMatchSome/1/{run_id}"):
        error = error_of(get(server, path), 404, "404 NOT_FOUND")
        assert error["code"] == "not_found"


def test_the_expire_behaviour_forgets_runs_after_expire_after(server: SimulatorServer) -> None:
    segment = server.simulator.account.segment("88")
    assert segment is not None
    assert segment.behavior is Behavior.EXPIRE
    assert segment.expire_after == 60.0
    run_id = start(server, "88")["run_id"]
    server.simulator.advance_clock(59)
    assert read(server, "88", run_id)["matches"] == server.simulator.truth("88")[:20]
    server.simulator.advance_clock(2)
    error_of(get(server, f"/api/3/segmentMatchAll/88/{run_id}"), 404, "404 NOT_FOUND")
    server.simulator.advance_clock(-DAY)  # forgotten for good, even if the clock went back
    error_of(get(server, f"/api/3/segmentMatchAll/88/{run_id}"), 404, "404 NOT_FOUND")


def test_unknown_runs_and_segments_are_404(server: SimulatorServer) -> None:
    run_id = start(server, "1")["run_id"]
    for path in (
        f"/api/3/segmentMatchAll/3/{run_id}",  # a real run, but of another segment
        f"/api/3/segmentMatchAll/1/{uuid.uuid4()}",
        f"/api/3/segmentMatchSome/1/{uuid.uuid4()}",
        "/api/3/segmentMatchAll/404404",
        "/api/3/segmentMatchAll/a..b",
        "/api/3/segmentMatchAll/%20",
        f"/api/3/segmentMatchAll/{'9' * 300}",
        "/api/3/audiences/404404",
        "/api/3/audiences/a..b",
    ):
        error_of(get(server, path), 404, "404 NOT_FOUND")
    assert len(server.simulator.runs) == 1


def test_a_segment_id_is_any_string_the_account_holds(serve_simulator: ServeSimulator) -> None:
    """The documents type `segmentId` as a string: the simulator serves ids the client would refuse
    to send (its own rules are stricter), so that the two never read each other's rules."""
    odd = SimAccount([SimSegment("a b", "Spaced", 3), SimSegment("x..y", "Dotted", 2)])
    server = serve_simulator(odd)
    for segment_id in ("a b", "x..y"):
        quoted = segment_id.replace(" ", "%20")
        run = start(server, quoted)
        assert run["segment_id"] == segment_id
        assert read(server, quoted, run["run_id"])["matches"] == server.simulator.truth(segment_id)
        (summary,) = get(server, f"/api/3/audiences/{quoted}").json()["data"]
        assert summary["attributes"]["segment_id"] == segment_id
    error_of(get(server, "/api/3/segmentMatchAll/A%20B"), 404, "404 NOT_FOUND")  # compared exactly


def test_another_sort_rekicks_the_run_under_the_same_id(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(ready_after=30.0)
    started = start(server, "10001", instant="", sort="email")
    run_id = started["run_id"]
    server.simulator.advance_clock(31)
    ready = read(server, "10001", run_id, sort="email", page_size=500)
    assert ready["is_ready"] is True
    assert ready["matches"] == server.simulator.truth("10001", "email")[:500]

    rekicked = read(server, "10001", run_id, sort="-email")
    assert rekicked["run_id"] == run_id
    assert rekicked["run_id_start"] == started["run_id_start"]
    assert rekicked["is_ready"] is False
    assert not {"run_id_end", "matches", "page"} & rekicked.keys()
    assert read(server, "10001", run_id, sort="email")["is_ready"] is False  # the old order is gone too
    server.simulator.advance_clock(31)
    again = read(server, "10001", run_id, sort="email", page=2, page_size=500)
    assert again["is_ready"] is True
    assert again["matches"] == server.simulator.truth("10001", "email")[500:1_000]
    assert read(server, "10001", run_id, sort="email")["is_ready"] is True  # the same sort does not re-kick
    # Without `sort` the default `id` is asked for, which is another sort.
    assert read(server, "10001", run_id)["is_ready"] is False


def evolving_account() -> SimAccount:
    return SimAccount(
        seed=3,
        segments=[SimSegment("e", "Evolving", 20_000, churn=0.05, growth=0.02), SimSegment("s", "Static", 500)],
    )


def test_an_evolving_segment_changes_deterministically_from_run_to_run(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(evolving_account())
    generations = []
    for n in range(3):
        run_id = start(server, "e", instant="")["run_id"]
        assert server.simulator.generation("e") == n
        pages = [read(server, "e", run_id, page=page, page_size=10_000) for page in (1, 2, 3)]
        ids = [contact for page in pages for contact in page["matches"]]
        assert len(ids) == len(set(ids)) == pages[0]["page"]["total"]
        assert ids == server.simulator.truth("e")
        generations.append(set(ids))
    for before, after in itertools.pairwise(generations):
        left, joined = before - after, after - before
        assert 0.03 * len(before) < len(left) < 0.07 * len(before)  # about 5 % leave
        assert len(after) == round(len(before) * 1.02)  # and the segment grows by 2 %
        assert min(joined) > max(before)  # newcomers are new contacts
    again = evolving_account()  # another account of the same seed: the same history
    assert set(again.members("e", 2).tolist()) == generations[2]
    assert server.simulator.truth("e", generation=0) == sorted(generations[0])


def test_a_run_keeps_its_generation_and_static_segments_never_change(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(evolving_account())
    first = start(server, "e", instant="")["run_id"]
    start(server, "e", instant="")  # a later run moves the segment on
    assert read(server, "e", first, page_size=10_000)["matches"] == server.simulator.truth("e", generation=0)[:10_000]
    rekicked = read(server, "e", first, sort="-id", page_size=100)  # a re-kick is the same run: same members
    assert rekicked["matches"] == server.simulator.truth("e", "-id", generation=0)[:100]
    static = [start(server, "s", instant="")["run_id"] for _ in range(3)]
    assert {tuple(read(server, "s", run_id, page_size=1_000)["matches"]) for run_id in static} == {
        tuple(server.simulator.truth("s"))
    }
    with pytest.raises(ValueError, match="churn"):
        SimSegment("x", "bad", 1, churn=1.5)


def test_match_some_keeps_the_runs_sort_and_never_rekicks(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(ready_after=30.0)
    run_id = start(server, "10001", instant="", sort="last_name,-first_name")["run_id"]
    assert attributes_of(get(server, f"/api/3/segmentMatchSome/10001/{run_id}"))["is_ready"] is False
    server.simulator.advance_clock(31)
    truth = server.simulator.truth("10001", "last_name,-first_name")
    for sort in ("-email", "id", None):
        query: dict[str, Any] = {"page": 3, "page_size": 100} | ({} if sort is None else {"sort": sort})
        some = attributes_of(get(server, f"/api/3/segmentMatchSome/10001/{run_id}", query))
        assert some["is_ready"] is True
        assert some["matches"] == truth[200:300]
    assert read(server, "10001", run_id, sort="last_name,-first_name")["is_ready"] is True


def test_start_without_instant_waits_and_with_instant_does_not(serve_simulator: ServeSimulator) -> None:
    quick = serve_simulator(ready_after=0.0)
    first = start(quick, "25001", page_size=100)
    assert first["is_ready"] is True
    assert first["matches"] == quick.simulator.truth("25001")[:100]
    assert first["page"] == {"current_page": 1, "last_page": 251, "per_page": 100, "total": 25_001}
    assert start(quick, "25001", page=3, page_size=7)["matches"] == quick.simulator.truth("25001")[14:21]

    server = serve_simulator(ready_after=0.5)
    began = time.perf_counter()
    instant = start(server, "1", instant="")
    assert time.perf_counter() - began < 0.45
    assert instant["is_ready"] is False
    began = time.perf_counter()
    start(server, "1")
    assert time.perf_counter() - began >= 0.45  # it waited for the run


def test_start_without_instant_returns_page_one_of_a_quick_run(serve_simulator: ServeSimulator) -> None:
    pytest.importorskip("uvloop")  # uvicorn's loop when installed; the plain asyncio loop wakes on time
    server = serve_simulator(ready_after=0.0104)  # 10.4 ms: uvloop rounds the wait down to 10 ms
    not_ready = [attributes["is_ready"] for attributes in (start(server, "1") for _ in range(10))].count(False)
    assert not_ready == 0, f"{not_ready} of 10 start calls answered not ready"


# -- 2. behaviour: authentication and bad input --------------------------------------------------


API_PATHS = [
    "/api/3/segmentMatchAll/1",
    f"/api/3/segmentMatchAll/1/{uuid.UUID(int=1)}",
    f"/api/3/segmentMatchSome/1/{uuid.UUID(int=1)}",
    "/api/3/audiences",
]


def test_a_wrong_or_missing_token_is_403_with_the_error_body(server: SimulatorServer) -> None:
    for headers in ({}, {"Api-Token": "wrong-token"}, {"Api-Token": ""}, {"Api-Token": DEFAULT_TOKEN.upper()}):
        server.simulator.reset_stats()
        for path in API_PATHS:
            error = error_of(get(server, path, headers=headers), 403)
            assert error["code"] == "forbidden"
        assert server.simulator.stats()["by_status"] == {403: len(API_PATHS)}, headers
    assert server.simulator.runs == {}  # nothing was started
    assert get(server, "/api/3/audiences", headers={"api-token": DEFAULT_TOKEN}).status_code == 200


@pytest.mark.parametrize(
    "sort", ["name", "ID", "id,", ",id", "-", "--id", "email desc", "score-2", "last_name, email", "field-9", "id\n"]
)
def test_a_bad_sort_is_400_with_an_errors_body(shared: SimulatorServer, sort: str) -> None:
    server = shared
    run_id = start(server, "1")["run_id"]
    runs = len(server.simulator.runs)
    for path in ("/api/3/segmentMatchAll/1", f"/api/3/segmentMatchAll/1/{run_id}", "/api/3/segmentMatchAll/404"):
        error = error_of(get(server, path, sort=sort), 400)
        assert error["source"] == {"pointer": "/sort"}
        assert error["code"] == "invalid_parameter"
        assert "sort" in error["detail"]
    assert len(server.simulator.runs) == runs  # no run was started
    assert read(server, "1", run_id)["is_ready"] is True  # and the run was not re-kicked


@pytest.mark.parametrize("sort", ["score", "-score15", "field9", "last_name,-first_name,cdate", "score0123456789012"])
def test_every_sort_of_the_grammar_is_accepted(shared: SimulatorServer, sort: str) -> None:
    assert start(shared, "10001", sort=sort)["matches"] == shared.simulator.truth("10001", sort)[:20]


def test_a_bare_field_key_is_the_seed_documents_alone(shared: SimulatorServer) -> None:
    """The seed document (the result-set) lists `field` without an id; the companion, which alone
    declares the kick-off, lists only `field<custom-field-id>`: the kick-off refuses the bare key."""
    run_id = start(shared, "10001")["run_id"]
    for sort in ("field", "-field", "email,field"):
        assert read(shared, "10001", run_id, sort=sort)["run_id"] == run_id  # accepted (and re-kicked)
        assert error_of(get(shared, "/api/3/segmentMatchAll/10001", sort=sort), 400)["source"] == {"pointer": "/sort"}


@pytest.mark.parametrize("path", ["/api/3/segmentMatchAll/{segmentId}", "/api/3/segmentMatchAll/{segmentId}/{runId}"])
def test_every_key_of_the_documents_sort_enums_is_accepted(shared: SimulatorServer, path: str) -> None:
    """The keys come from the documents (both enums), a placeholder as a number."""
    run_id = start(shared, "1")["run_id"]
    keys = {
        key
        for op in contract.operation(path)
        for param in op.spec["parameters"]
        if param["name"] == "sort"
        for key in param["schema"]["enum"]
    }
    assert {"score<score-id>", "field<custom-field-id>"} <= keys
    for key in sorted({re.sub(r"<[^>]+>", "12", key) for key in keys}):
        url = path.replace("{segmentId}", "1").replace("{runId}", run_id)
        assert attributes_of(get(shared, url, sort=key))["segment_id"] == "1", key


def test_a_key_named_twice_orders_by_its_first_mention(shared: SimulatorServer) -> None:
    """The documents do not forbid it; a repeat adds nothing (the simulator's guess)."""
    assert start(shared, "10001", sort="email,-email")["matches"] == shared.simulator.truth("10001", "email")[:20]
    assert start(shared, "10001", sort="-id,id")["matches"] == shared.simulator.truth("10001", "-id")[:20]
    assert sort_keys("email,-email,id") == sort_keys("email,id")
    with pytest.raises(ValueError, match="no sort key"):
        sort_keys("nope")


@pytest.mark.parametrize("value", ["1", "true", " ", "instant"])
def test_instant_takes_only_the_documents_empty_value(shared: SimulatorServer, value: str) -> None:
    runs = len(shared.simulator.runs)
    error = error_of(get(shared, "/api/3/segmentMatchAll/1", instant=value), 400)
    assert error["source"] == {"pointer": "/instant"}
    assert len(shared.simulator.runs) == runs  # no run was started
    assert contract.parameter("/api/3/segmentMatchAll/{segmentId}", "instant") == {"type": "string", "enum": [""]}


@pytest.mark.parametrize(
    ("name", "value"), [("page_size", 10_001), ("page_size", "ten"), ("page", "1.5"), ("page", "nan"), ("page", "inf")]
)
def test_bad_paging_is_400_with_an_errors_body(shared: SimulatorServer, name: str, value: object) -> None:
    server = shared
    run_id = start(server, "1")["run_id"]
    for path in ("/api/3/segmentMatchAll/1", f"/api/3/segmentMatchAll/1/{run_id}", "/api/3/audiences"):
        error = error_of(get(server, path, {name: value}), 400)
        assert error["source"] == {"pointer": f"/{name}"}
    assert read(server, "1", run_id, page_size=10_000)["page"]["per_page"] == 10_000


def test_the_paging_bounds_are_the_documents(shared: SimulatorServer) -> None:
    """page_size's published maximum everywhere; the audiences' published minimums (400 below them),
    where the match-all endpoints publish none and read a page below 1 as 1 (see above)."""
    run_id = start(shared, "1")["run_id"]
    for template in ("/api/3/segmentMatchAll/{segmentId}", RESULT_SET, "/api/3/segmentMatchSome/{segmentId}/{runId}"):
        path = template.replace("{segmentId}", "1").replace("{runId}", run_id)
        schema = contract.parameter(template, "page_size")
        assert schema is not None
        maximum = schema["maximum"]
        assert maximum == 10_000
        assert attributes_of(get(shared, path, page_size=maximum))["page"]["per_page"] == maximum
        assert error_of(get(shared, path, page_size=maximum + 1), 400)["source"] == {"pointer": "/page_size"}
    page, size = (contract.parameter("/api/3/audiences", name) for name in ("page", "page_size"))
    assert page is not None
    assert size is not None
    assert (page["minimum"], size["minimum"], size["maximum"]) == (1, 1, 10_000)
    for params, name in [
        ({"page": 0}, "page"),
        ({"page": -1}, "page"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": -5}, "page_size"),
        ({"page_size": 10_001}, "page_size"),
    ]:
        assert error_of(get(shared, "/api/3/audiences", params), 400)["source"] == {"pointer": f"/{name}"}
    assert len(get(shared, "/api/3/audiences", page=1, page_size=1).json()["data"]) == 1
    assert len(get(shared, "/api/3/audiences").json()["data"]) == 12  # the default size, 20, holds them all


def test_integers_beyond_int32_are_refused(shared: SimulatorServer) -> None:
    """The seed document gives `page` and `page_size` no bounds but echoes them as int32."""
    server = shared
    run_id = start(server, "1")["run_id"]
    for name, value in [("page", 2**31 + 1), ("page", -(2**31) - 1), ("page_size", -(10**12)), ("page", 10**30)]:
        for path in (f"/api/3/segmentMatchAll/1/{run_id}", "/api/3/audiences"):
            error = error_of(get(server, path, {name: value}), 400)
            assert error["source"] == {"pointer": f"/{name}"}
    assert read(server, "1", run_id, page=2**31 - 1)["page"]["current_page"] == 2**31 - 1


def test_the_int32_bound_is_exact(shared: SimulatorServer) -> None:
    run_id = start(shared, "1")["run_id"]
    error_of(get(shared, f"/api/3/segmentMatchAll/1/{run_id}", page=2**31), 400)


@pytest.mark.parametrize(("name", "value"), [("page", ""), ("page_size", ""), ("sort", ""), ("page", "1_000")], ids=str)
def test_empty_or_misspelt_parameters_are_refused(shared: SimulatorServer, name: str, value: str) -> None:
    run_id = start(shared, "1")["run_id"]
    error = error_of(get(shared, f"/api/3/segmentMatchAll/1/{run_id}", {name: value}), 400)
    assert error["source"] == {"pointer": f"/{name}"}


# -- 2. behaviour: the account limit and statistics ----------------------------------------------


def test_the_account_limit_answers_429_beyond_5_a_second(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(requests_per_second=5)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as client:
            return await asyncio.gather(*(client.get("/api/3/audiences") for _ in range(12)))

    responses = asyncio.run(burst())
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 5 + [429] * 7
    for response in responses:
        if response.status_code == 429:
            error_of(response, 429)
            assert response.headers["Retry-After"] == "1"
            assert response.headers["RateLimit-Limit"] == "5"
            assert response.headers["RateLimit-Remaining"] == "0"
        else:
            assert "Retry-After" not in response.headers
    stats = server.simulator.stats()
    assert stats["requests"] == 12
    assert stats["max_requests_in_any_second"] == 12
    assert stats["by_status"] == {200: 5, 429: 7}

    time.sleep(1.05)  # the limiter runs on real time; Retry-After: 1 was honest
    assert get(server, "/api/3/audiences").status_code == 200
    stats = server.simulator.stats()
    assert stats["requests"] == 13
    assert stats["max_requests_in_any_second"] == 12


def test_a_fractional_limit_reports_what_it_admits(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(requests_per_second=0.5)
    assert get(server, "/api/3/audiences").status_code == 200
    limited = get(server, "/api/3/audiences")
    assert limited.status_code == 429
    assert limited.headers["RateLimit-Limit"] == "1"


def test_stats_count_requests_by_status(server: SimulatorServer) -> None:
    start(server, "1")
    get(server, "/api/3/audiences", headers={})
    get(server, "/api/3/segmentMatchAll/1", sort="nope")
    get(server, "/api/3/segmentMatchAll/404")
    stats = httpx.get(f"{server.url}/_simulator/stats", timeout=10).json()
    assert stats["requests"] == 4
    assert stats["max_requests_in_any_second"] == 4
    assert stats["by_status"] == {"200": 1, "403": 1, "400": 1, "404": 1}
    assert stats["faults_injected"] == {}
    assert "arrivals" not in stats
    assert stats["first_request_at"] <= stats["last_request_at"]
    arrivals = httpx.get(f"{server.url}/_simulator/stats", params={"arrivals": 1}, timeout=10).json()["arrivals"]
    assert len(arrivals) == 4  # the admin calls are not counted
    assert arrivals == sorted(arrivals)

    assert httpx.post(f"{server.url}/_simulator/stats/reset", timeout=10).json() == {"ok": True}
    stats = httpx.get(f"{server.url}/_simulator/stats", timeout=10).json()
    assert stats["requests"] == 0
    assert stats["by_status"] == {}
    assert stats["max_requests_in_any_second"] == 0


def test_the_admin_routes_move_the_clock_and_set_faults(server: SimulatorServer) -> None:
    run_id = start(server, "1")["run_id"]
    assert httpx.post(f"{server.url}/_simulator/clock", params={"advance": "abc"}, timeout=10).status_code == 400
    moved = httpx.post(f"{server.url}/_simulator/clock", params={"advance": 90 * DAY}, timeout=10).json()
    assert when(moved["now"]) > datetime.now(UTC) + timedelta(days=89)
    error_of(get(server, f"/api/3/segmentMatchAll/1/{run_id}"), 404, "404 NOT_FOUND")

    faults_url = f"{server.url}/_simulator/faults"
    assert httpx.post(faults_url, json={"error_rate": 1.0}, timeout=10).json()["error_rate"] == 1.0
    assert get(server, "/api/3/audiences").status_code in {500, 502, 503, 504}
    for bad in ({"error_rate": 2}, {"bogus": 1}):
        assert httpx.post(faults_url, json=bad, timeout=10).status_code == 400
    assert httpx.get(faults_url, timeout=10).json()["error_rate"] == 1.0


# -- 2. behaviour: audiences ----------------------------------------------------------------------


def summaries(server: SimulatorServer, path: str = "/api/3/audiences", **params: Any) -> list[dict[str, Any]]:
    response = get(server, path, **params)
    assert response.status_code == 200, response.text
    assert response.json().keys() == {"data"}
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def ids_of(items: list[dict[str, Any]]) -> list[str]:
    return [item["attributes"]["segment_id"] for item in items]


def test_audiences_page_and_search_and_404_when_none(serve_simulator: ServeSimulator) -> None:
    many = SimAccount(
        [SimSegment(str(i), f"Segment {i:04d}", i) for i in range(1, 2_501)] + [SimSegment("vip", "VIP", 3)]
    )
    server = serve_simulator(many)
    assert len(summaries(server)) == 20  # the documents' default page_size
    pages = [summaries(server, page=page, page_size=1_000, sort="name") for page in (1, 2, 3, 4)]
    assert [len(page) for page in pages] == [1_000, 1_000, 501, 0]  # a page past the end holds none
    assert ids_of([item for page in pages for item in page]) == [s.id for s in many.segments]
    assert ids_of(summaries(server, search="vIp")) == ["vip"]
    assert len(summaries(server, search="segment 00", page_size=1_000)) == 99
    assert len(summaries(server, search="", page_size=10_000)) == 2_501
    error_of(get(server, "/api/3/audiences", search="no such segment"), 404, "404 NOT_FOUND")
    error_of(get(serve_simulator(SimAccount([])), "/api/3/audiences"), 404, "404 NOT_FOUND")


def test_audiences_sort_by_every_key_of_the_documents_enum(serve_simulator: ServeSimulator) -> None:
    account = SimAccount(
        [
            SimSegment(f"{i}", name, size)
            for i, (name, size) in enumerate(
                [("beta", 30), ("Alpha", 10), ("gamma", 20), ("delta", 0), ("Epsilon", 50)], 1
            )
        ],
        seed=2,
    )
    server = serve_simulator(account)
    for segment_id in ("3", "5"):
        start(server, segment_id)  # used: the most recent two, segment 5 last
    every = summaries(server)
    enum = contract.parameter("/api/3/audiences", "sort")
    assert enum is not None
    assert every == summaries(server, sort=enum["default"]) == summaries(server, sort="-updated_date")

    def by(sort: str) -> list[str]:
        return ids_of(summaries(server, sort=sort))

    def values(name: str, items: list[dict[str, Any]]) -> list[Any]:
        return [item["attributes"].get(name) for item in items]

    assert values("updated_date", every) == sorted(values("updated_date", every), reverse=True)
    assert by("updated_date") == by("-updated_date")[::-1]
    assert by("name") == ["2", "1", "4", "5", "3"]  # Alpha, beta, delta, Epsilon, gamma: case aside
    assert by("-name") == by("name")[::-1]
    assert by("-recent")[:2] == ["5", "3"]
    assert by("recent")[-2:] == ["3", "5"]
    counted = {
        item["attributes"]["segment_id"]: item["attributes"].get("counts", {}).get("last_total", {}).get("count", -1)
        for item in every
    }
    assert [counted[i] for i in by("last_total")] == sorted(counted.values())
    assert [counted[i] for i in by("-last_total")] == sorted(counted.values(), reverse=True)
    active = by("last_active_total")
    assert sorted(active) == sorted(counted)
    assert by("-last_active_total") != active
    for value in enum["enum"]:
        assert len(by(value)) == 5
    for bad in ("id", "-id", "size", "name,-recent", "NAME", "", "--name"):
        assert error_of(get(server, "/api/3/audiences", sort=bad), 400)["source"] == {"pointer": "/sort"}


def test_a_summary_tells_the_latest_finished_run(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(evolving_account(), ready_after=30.0)

    def last_total(segment_id: str) -> dict[str, Any] | None:
        (item,) = summaries(server, f"/api/3/audiences/{segment_id}")
        assert item["attributes"]["segment_id"] == segment_id
        assert item["id"] != segment_id
        found: dict[str, Any] | None = item["attributes"].get("counts", {}).get("last_total")
        return found

    before = last_total("e")
    assert before is None or set(before) == {"count", "last_total_updated"}
    first = start(server, "e", instant="")
    assert last_total("e") == before  # still running: counts nothing yet
    server.simulator.advance_clock(31)
    counted = last_total("e")
    assert counted is not None
    assert counted["run_id"] == first["run_id"]
    assert counted["run_id_start"] == first["run_id_start"]
    ready = read(server, "e", first["run_id"])
    assert counted["run_id_end"] == counted["last_total_updated"] == ready["run_id_end"]
    assert counted["count"] == ready["page"]["total"] == 20_000
    second = start(server, "e", instant="")["run_id"]
    server.simulator.advance_clock(31)
    again = last_total("e")
    assert again is not None
    assert again["run_id"] == second
    assert again["count"] == read(server, "e", second)["page"]["total"] == round(20_000 * 1.02)
    (item,) = summaries(server, "/api/3/audiences/e")
    assert item["attributes"]["last_used_date"] == again["run_id_start"]


def test_summaries_are_the_same_for_the_same_seed_and_dated_in_order() -> None:
    one, two = (Simulator(make_account()) for _ in range(2))
    other = Simulator(SimAccount(make_account().segments, seed=8))
    for segment in make_account().segments:
        summary = one._summary(segment)
        assert summary == two._summary(segment)
        assert summary != other._summary(segment)
        attributes = summary["attributes"]
        assert attributes["category"] == "audience"
        assert attributes["created_date"] <= attributes["updated_date"]
        assert when(attributes["updated_date"]) == one.account.segment_timestamp(segment)  # = segment_timestamp
        for count in attributes.get("counts", {}).values():
            assert count["count"] == int(count["count"]) >= 0
            assert count["last_total_updated"] >= attributes["updated_date"]


def test_segment_9_that_never_finishes_a_run_counts_nothing_new(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(ready_after=0.0)
    before = summaries(server, "/api/3/audiences/77")
    start(server, "77")
    assert summaries(server, "/api/3/audiences/77") == before


# -- 2. behaviour: the answer hook -----------------------------------------------------------------


def test_the_answer_hook_sees_every_api_answer_as_sent(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator()
    seen: list[Answer] = []
    checking = server.simulator.on_answer
    assert checking is not None  # conftest's strict validation

    def both(answer: Answer) -> None:
        seen.append(answer)
        checking(answer)

    server.simulator.on_answer = both
    run_id = start(server, "1")["run_id"]
    ready = get(server, f"/api/3/segmentMatchAll/1/{run_id}", page_size=3)
    refused = get(server, "/api/3/audiences", sort="bogus")
    httpx.get(f"{server.url}/_simulator/stats", timeout=10)  # control routes are not API answers
    server.simulator.set_faults(Faults(truncate_rate=1.0))
    cut = get(server, "/api/3/audiences/1")
    assert [(a.path, a.method, a.status, a.fault) for a in seen] == [
        ("/api/3/segmentMatchAll/{segmentId}", "GET", 200, None),
        ("/api/3/segmentMatchAll/{segmentId}/{runId}", "GET", 200, None),
        ("/api/3/audiences", "GET", 400, None),
        ("/api/3/audiences/{segmentId}", "GET", 200, "truncated"),
    ]
    assert [a.body for a in seen[1:]] == [ready.content, refused.content, cut.content]
    assert seen[1].content_type == "application/json"


def test_without_a_hook_answers_are_served_alike() -> None:
    simulator = Simulator(make_account(), SimulatorConfig(requests_per_second=0, ready_after=0))
    assert simulator.on_answer is None
    with SimulatorServer(simulator) as server:
        assert start(server, "1")["matches"] == simulator.truth("1")


# -- 2. behaviour: fault injection ----------------------------------------------------------------


def test_injected_5xx(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(faults=Faults(error_rate=1.0), seed=2)
    statuses = [get(server, "/api/3/audiences").status_code for _ in range(12)]
    assert set(statuses) <= {500, 502, 503, 504}
    assert len(set(statuses)) > 1
    assert get(server, "/api/3/audiences", headers={}).status_code == 403  # auth comes first
    injected = server.simulator.stats()["faults_injected"]
    assert injected == {f"http_{status}": statuses.count(status) for status in set(statuses)}
    response = get(server, "/api/3/audiences")
    assert response.headers["content-type"].startswith("text/html")


def test_injected_truncation_is_invalid_json_of_a_consistent_length(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator()
    whole = get(server, "/api/3/audiences", page_size=100).content
    server.simulator.set_faults(Faults(truncate_rate=1.0))
    for _ in range(5):
        response = get(server, "/api/3/audiences", page_size=100)
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(response.content)
        assert whole.startswith(response.content)
        assert len(response.content) < len(whole)
        with pytest.raises(ValueError, match=r"Expecting|Unterminated|Extra data|char"):
            json.loads(response.content)
    error_of(get(server, "/api/3/segmentMatchAll/404"), 404, "404 NOT_FOUND")  # only 200s are cut
    assert server.simulator.stats()["faults_injected"] == {"truncated": 5}


def test_injected_resets_drop_the_connection_mid_body(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(faults=Faults(reset_rate=1.0))
    for _ in range(3):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            get(server, "/api/3/segmentMatchAll/25001", page_size=10_000)
    assert server.simulator.stats()["faults_injected"] == {"reset": 3}


@pytest.mark.parametrize("retry_after", [True, False])
def test_injected_429_bursts(serve_simulator: ServeSimulator, retry_after: bool) -> None:
    server = serve_simulator(faults=Faults(burst_429_rate=1.0, burst_429_length=3, burst_429_retry_after=retry_after))
    first = get(server, "/api/3/audiences")
    server.simulator.set_faults(Faults(burst_429_length=3, burst_429_retry_after=retry_after))  # no new bursts
    answers = [first] + [get(server, "/api/3/audiences") for _ in range(3)]
    assert [response.status_code for response in answers] == [429, 429, 429, 200]  # the burst runs its length
    for response in answers[:3]:
        error_of(response, 429)
        assert response.headers.get("Retry-After") == ("1" if retry_after else None)
        assert "RateLimit-Limit" not in response.headers
    assert server.simulator.stats()["faults_injected"] == {"429_burst": 3}


def test_a_burst_is_not_spent_on_a_403(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(faults=Faults(burst_429_rate=1.0, burst_429_length=2))
    assert get(server, "/api/3/audiences", headers={}).status_code == 403
    stats = server.simulator.stats()
    assert stats["faults_injected"].get("429_burst", 0) == stats["by_status"].get(429, 0)


def test_injected_slow_answers_and_latency(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(faults=Faults(slow_rate=1.0, slow_ms=300))
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{server.url}/api/3/audiences", headers=AUTH, timeout=0.1)
    began = time.perf_counter()
    assert get(server, "/api/3/audiences").status_code == 200
    assert time.perf_counter() - began >= 0.29
    assert server.simulator.stats()["faults_injected"] == {"slow": 2}

    server.simulator.set_faults(Faults(latency_ms=100))
    began = time.perf_counter()
    assert get(server, "/api/3/audiences").status_code == 200
    assert time.perf_counter() - began >= 0.099
    assert server.simulator.stats()["faults_injected"] == {"slow": 2}  # latency is not a fault


def test_fault_rates_are_checked() -> None:
    for bad in ({"error_rate": 1.5}, {"reset_rate": -0.1}, {"slow_ms": -1.0}, {"burst_429_length": -1}):
        with pytest.raises(ValueError, match="must"):
            Faults(**bad)


def test_the_same_seed_injects_the_same_faults(serve_simulator: ServeSimulator) -> None:
    faults = Faults(error_rate=0.2, truncate_rate=0.2, reset_rate=0.1, burst_429_rate=0.1)

    def outcomes(seed: int) -> tuple[list[str], dict[str, int]]:
        server = serve_simulator(faults=faults, seed=seed)
        seen = []
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
            for _ in range(30):
                try:
                    response = client.get("/api/3/audiences")
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    seen.append("reset")
                    continue
                try:
                    if response.status_code == 200:
                        json.loads(response.content)
                except ValueError:
                    seen.append("truncated")
                else:
                    seen.append(str(response.status_code))
        return seen, server.simulator.stats()["faults_injected"]

    first, again, other = outcomes(6), outcomes(6), outcomes(7)
    assert first == again
    assert first != other
    assert {"reset", "truncated", "429", "200"} < set(first[0]), first[0]  # and some 5xx


# -- 2. behaviour: determinism and the ground truth ----------------------------------------------

SORTS = ["id", "-id", "email", "-phone", "score2", "last_name,-first_name", "-field9,cdate"]


def test_the_same_seed_gives_the_same_members_and_orders() -> None:
    one, two = make_account(), make_account()
    other = SimAccount(make_account().segments, seed=8)
    for segment_id in ("25001", UUID_SEGMENT, "1"):
        segment = one.segment(segment_id)
        assert segment is not None
        members = one.members(segment_id)
        assert np.array_equal(members, two.members(segment_id))
        assert members.size == segment.size
        assert members[0] > 0
        assert np.all(np.diff(members) > 0)
        assert not np.array_equal(members, other.members(segment_id))
        for sort in SORTS:
            assert np.array_equal(one.ordered(segment_id, sort), two.ordered(segment_id, sort))
            assert not np.array_equal(one.ordered(segment_id, sort), other.ordered(segment_id, sort))
        assert one.segment_timestamp(segment) == two.segment_timestamp(segment)
    ids = one.members("25001")
    assert not np.array_equal(one.key_values(ids, "email"), other.key_values(ids, "email"))
    # The run ids a simulator hands out follow its seed too.
    runs = [Simulator(make_account(), SimulatorConfig(seed=seed)) for seed in (1, 1, 2)]
    first = runs[0].account.segment("1")
    assert first is not None
    ids_of = [[simulator.start_run(first, "id").run_id for _ in range(3)] for simulator in runs]
    assert ids_of[0] == ids_of[1] != ids_of[2]


@pytest.mark.parametrize(
    ("sort", "ties"),
    [
        ("first_name", True),
        ("last_name,-first_name", True),
        ("-account_name,score", True),
        ("first_name,-id", False),
        ("-score2,field9,email", False),
        ("full_name,-udate,phone", False),
        ("-id", False),
    ],
)
def test_a_sorts_ground_truth_is_ordered_by_its_keys_then_id(sort: str, ties: bool) -> None:
    account = make_account()
    ordered = account.ordered("10001", sort)
    assert np.array_equal(np.sort(ordered), account.members("10001"))
    columns = [
        -account.key_values(ordered, key.field) if key.descending else account.key_values(ordered, key.field)
        for key in sort_keys(sort)
    ]
    columns.append(ordered)  # the final tie-break: id ascending
    equal_so_far = np.ones(ordered.size - 1, dtype=bool)  # neighbours equal on every column so far
    tied_on_keys = 0
    for column in columns:
        tied_on_keys = int(equal_so_far.sum())
        assert not np.any(equal_so_far & (column[:-1] > column[1:])), f"{sort}: out of order"
        equal_so_far &= column[:-1] == column[1:]
    assert not equal_so_far.any()  # every neighbour differs in some key or the id: a strict order
    # Keys tie often enough that the id tie-break is really exercised (or never, when -id is a key).
    assert (tied_on_keys > 10) if ties else (tied_on_keys == 0 or sort.endswith("-id"))


def test_a_multi_key_sort_is_served_in_its_ground_truth_order(shared: SimulatorServer) -> None:
    server = shared
    sort = "last_name,-first_name"
    run_id = start(server, "10001", sort=sort)["run_id"]
    pages = [read(server, "10001", run_id, sort=sort, page=page, page_size=5_000)["matches"] for page in (1, 2, 3)]
    assert [contact for page in pages for contact in page] == server.simulator.truth("10001", sort)


# -- 3. cost --------------------------------------------------------------------------------------


def test_a_10000_id_page_costs_milliseconds(capsys: pytest.CaptureFixture[str]) -> None:
    simulator = Simulator(make_account(), SimulatorConfig(requests_per_second=0, ready_after=0))
    segment = simulator.account.segment("1000000")
    assert segment is not None
    sort = "last_name,-first_name"
    run = simulator.start_run(segment, sort)
    url = f"/api/3/segmentMatchAll/1000000/{run.run_id}"
    params: dict[str, str | int] = {"sort": sort, "page": 37, "page_size": 10_000}

    async def timed_requests() -> list[float]:
        transport = httpx.ASGITransport(app=simulator.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=AUTH) as client:
            warm = await client.get(url, params=params)  # computes and caches the million-id order
            assert warm.json()["data"][0]["attributes"]["matches"] == simulator.truth("1000000", sort)[360_000:370_000]
            seconds = []
            for _ in range(20):
                began = time.perf_counter()
                response = await client.get(url, params=params)
                seconds.append(time.perf_counter() - began)
                assert response.status_code == 200
                assert len(response.content) > 60_000
            return seconds

    asgi_ms = statistics.median(asyncio.run(timed_requests())) * 1_000
    direct = []
    for _ in range(20):
        began = time.perf_counter()
        JSONResponse(simulator._run_body(run, 37, 10_000))  # renders the body
        direct.append(time.perf_counter() - began)
    direct_ms = statistics.median(direct) * 1_000
    with capsys.disabled():
        print(f"\n10,000-id page: {direct_ms:.2f} ms to build and encode, {asgi_ms:.2f} ms through the ASGI app")
    assert asgi_ms < 50
    assert direct_ms < 50


# -- 4. the faults of the fault-injection campaign ------------------------------------------------


def not_ready_page(server: SimulatorServer, path: str, page: int, **params: Any) -> dict[str, Any]:
    """A page past the first that answers not ready: it has no `page` to number its data id by."""
    response = get(server, path, page=page, **params)
    assert response.status_code == 200, response.text
    (data,) = response.json()["data"]
    assert data["id"] == f"{data['attributes']['run_id']}-{page}"
    attributes: dict[str, Any] = data["attributes"]
    assert attributes["is_ready"] is False
    return attributes


def pages_of(
    server: SimulatorServer, segment_id: str, run_id: str, pages: range, **params: Any
) -> list[dict[str, Any]]:
    return [read(server, segment_id, run_id, page=page, **params) for page in pages]


def test_injected_total_drift_tells_another_total_with_its_own_last_page(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(seed=3)
    run_id = start(server, "25001")["run_id"]
    empty_run = start(server, "100")["run_id"]
    server.simulator.set_faults(Faults(total_drift_rate=1.0))
    truth = server.simulator.truth("25001")
    for number, attributes in enumerate(pages_of(server, "25001", run_id, range(1, 4), page_size=10_000), 1):
        page = attributes["page"]
        assert page["total"] != 25_001
        assert abs(page["total"] - 25_001) <= 3
        assert page["last_page"] == -(-page["total"] // 10_000)  # a page consistent with itself
        assert (page["current_page"], page["per_page"]) == (number, 10_000)
        assert attributes["matches"] == truth[(number - 1) * 10_000 : number * 10_000]  # the ids are right
    empty = read(server, "100", empty_run)
    assert 1 <= empty["page"]["total"] <= 3  # never below zero
    assert empty["matches"] == []
    assert server.simulator.stats()["faults_injected"] == {"total_drift": 4}


def test_injected_duplicates_replace_one_id_by_an_id_of_another_page(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(seed=4)
    run_id = start(server, "25001")["run_id"]
    single = start(server, "9999")["run_id"]
    server.simulator.set_faults(Faults(duplicate_rate=1.0))
    truth = server.simulator.truth("25001")
    for number in (1, 2, 3):
        attributes = read(server, "25001", run_id, page=number, page_size=10_000)
        expected = truth[(number - 1) * 10_000 : number * 10_000]
        matches = attributes["matches"]
        assert len(matches) == len(expected)
        (changed,) = [i for i, (got, due) in enumerate(zip(matches, expected, strict=True)) if got != due]
        assert matches[changed] in truth
        assert matches[changed] not in expected  # it belongs to another page
        assert attributes["page"]["total"] == 25_001
    # A run of one page has no other page to take an id from.
    assert read(server, "9999", single, page_size=10_000)["matches"] == server.simulator.truth("9999")
    assert server.simulator.stats()["faults_injected"] == {"duplicate": 3}


def test_injected_short_pages_lose_ids_before_the_last_page_only(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(seed=5)
    run_id = start(server, "25001")["run_id"]
    server.simulator.set_faults(Faults(short_page_rate=1.0))
    truth = server.simulator.truth("25001")
    first, second, last = pages_of(server, "25001", run_id, range(1, 4), page_size=10_000)
    for number, attributes in ((1, first), (2, second)):
        expected = truth[(number - 1) * 10_000 : number * 10_000]
        matches = attributes["matches"]
        assert len(matches) < 10_000
        cut = next((i for i, (got, due) in enumerate(zip(matches, expected, strict=False)) if got != due), len(matches))
        missing = len(expected) - len(matches)
        assert matches == expected[:cut] + expected[cut + missing :]  # one run of ids is gone
        assert attributes["page"] == {"current_page": number, "last_page": 3, "per_page": 10_000, "total": 25_001}
    assert last["matches"] == truth[20_000:]  # the last page is as it should be
    assert server.simulator.stats()["faults_injected"] == {"short_page": 2}


def test_injected_non_json_bodies_are_200_with_an_html_page(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator(faults=Faults(non_json_rate=1.0))
    for path in ("/api/3/audiences", "/api/3/segmentMatchAll/1"):
        response = get(server, path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert response.content.startswith(b"<!DOCTYPE html>")
        with pytest.raises(ValueError, match="Expecting value"):
            json.loads(response.content)
    error_of(get(server, "/api/3/segmentMatchAll/404"), 404, "404 NOT_FOUND")  # only 200s are replaced
    assert server.simulator.stats()["faults_injected"] == {"non_json": 2}


def test_an_injected_rekick_turns_a_ready_run_not_ready_mid_read(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator()
    started = start(server, "25001", sort="email")
    run_id = started["run_id"]
    server.simulator.set_faults(Faults(rekick_rate=1.0, rekick_ms=60_000))
    assert read(server, "25001", run_id, sort="email", page_size=1_000)["is_ready"] is True  # page 1: no
    rekicked = not_ready_page(server, f"/api/3/segmentMatchAll/25001/{run_id}", 2, sort="email", page_size=1_000)
    assert rekicked["run_id"] == run_id
    assert rekicked["run_id_start"] == started["run_id_start"]
    assert not {"run_id_end", "matches", "page"} & rekicked.keys()  # running, not failed
    assert read(server, "25001", run_id, sort="email")["is_ready"] is False  # searching again, for a minute
    # Match-some reads the same run (still searching), and never re-kicks it itself.
    not_ready_page(server, f"/api/3/segmentMatchSome/25001/{run_id}", 2)
    assert server.simulator.stats()["faults_injected"] == {"rekick": 1}

    server.simulator.advance_clock(61)
    server.simulator.set_faults(Faults())
    again = read(server, "25001", run_id, sort="email", page=2, page_size=1_000)
    assert again["is_ready"] is True
    assert again["matches"] == server.simulator.truth("25001", "email")[1_000:2_000]
    assert when(again["run_id_end"]) > when(started["run_id_end"])  # its search ended again, later


def test_a_rekick_of_zero_ms_answers_not_ready_once(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator()
    run_id = start(server, "10001")["run_id"]
    server.simulator.set_faults(Faults(rekick_rate=1.0, rekick_ms=0))
    not_ready_page(server, f"/api/3/segmentMatchAll/10001/{run_id}", 2, page_size=5_000)
    server.simulator.set_faults(Faults())
    assert read(server, "10001", run_id, page=2, page_size=5_000)["is_ready"] is True
    # Failed runs are not re-kicked: they stay failed.
    failing = start(server, "77", instant="")["run_id"]
    server.simulator.set_faults(Faults(rekick_rate=1.0, rekick_ms=0))
    assert "run_id_end" in not_ready_page(server, f"/api/3/segmentMatchAll/77/{failing}", 2)
    assert server.simulator.stats()["faults_injected"] == {"rekick": 1}


@pytest.mark.parametrize("seconds", [0, 7])
def test_the_retry_after_of_burst_429s_is_configurable(serve_simulator: ServeSimulator, seconds: int) -> None:
    server = serve_simulator(
        faults=Faults(burst_429_rate=1.0, burst_429_length=1, burst_429_retry_after_seconds=seconds)
    )
    response = get(server, "/api/3/audiences")
    error_of(response, 429)
    assert response.headers["Retry-After"] == str(seconds)
    server.simulator.set_faults(Faults(burst_429_rate=1.0, burst_429_retry_after=False))
    assert "Retry-After" not in get(server, "/api/3/audiences").headers


def test_the_new_fault_settings_are_checked() -> None:
    for bad in (
        {"non_json_rate": 1.01},
        {"total_drift_rate": -0.5},
        {"duplicate_rate": 2.0},
        {"short_page_rate": -1e-9},
        {"rekick_rate": 1.5},
        {"rekick_ms": -1.0},
        {"burst_429_retry_after_seconds": -1},
    ):
        with pytest.raises(ValueError, match="must"):
            Faults(**bad)
    assert not Faults().page_faults
    assert Faults(short_page_rate=0.1).page_faults


def test_reseeding_repeats_the_faults_and_ends_a_burst(serve_simulator: ServeSimulator) -> None:
    faults = Faults(error_rate=0.3, non_json_rate=0.3, burst_429_rate=0.2, burst_429_length=4)
    server = serve_simulator(faults=faults)

    def statuses(seed: int) -> list[str]:
        server.simulator.reseed(seed)
        seen = []
        for _ in range(25):
            response = get(server, "/api/3/audiences")
            seen.append(f"{response.status_code} {response.headers['content-type'].split(';')[0]}")
        return seen

    first = statuses(9)
    assert statuses(9) == first
    assert statuses(10) != first
    assert {"200 application/json", "200 text/html", "429 application/json"} <= set(first)
    server.simulator.set_faults(Faults(burst_429_rate=1.0, burst_429_length=100))
    assert get(server, "/api/3/audiences").status_code == 429
    server.simulator.set_faults(Faults())
    assert get(server, "/api/3/audiences").status_code == 429  # the burst goes on ...
    server.simulator.reseed(0)
    assert get(server, "/api/3/audiences").status_code == 200  # ... until a reseed ends it


def test_every_fault_is_an_option_of_matchall_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Simulator] = []
    # The command imports the server when it runs (the simulator extra): replace it where it is.
    monkeypatch.setattr(simulator_server, "serve", lambda simulator, **_: served.append(simulator))
    settings = {
        "non_json_rate": 0.25,
        "total_drift_rate": 0.5,
        "duplicate_rate": 0.125,
        "short_page_rate": 0.75,
        "rekick_rate": 0.0625,
        "rekick_ms": 250.0,
        "burst_429_retry_after_seconds": 0,
    }
    env = {f"MATCHALL_SIM_{name.upper()}": str(value) for name, value in settings.items()}
    result = CliRunner().invoke(cli.main, ["simulator"], env=env)
    assert result.exit_code == 0, result.output
    (simulator,) = served
    assert {name: getattr(simulator.faults, name) for name in settings} == settings

    help_text = CliRunner().invoke(cli.main, ["simulator", "--help"]).output
    for name in (field.name for field in fields(Faults)):
        if name != "burst_429_retry_after":  # a flag of its own: --[no-]burst-429-retry-after
            assert f"--{name.replace('_', '-')}" in help_text, name
    refused = CliRunner().invoke(cli.main, ["simulator", "--duplicate-rate", "1.5"])
    assert refused.exit_code == 1
    assert "duplicate_rate must be between 0 and 1" in refused.output


def test_a_10000_id_page_with_every_page_fault_costs_milliseconds(capsys: pytest.CaptureFixture[str]) -> None:
    faults = Faults(total_drift_rate=1.0, duplicate_rate=1.0, short_page_rate=1.0)
    simulator = Simulator(make_account(), SimulatorConfig(requests_per_second=0, ready_after=0, faults=faults))
    segment = simulator.account.segment("1000000")
    assert segment is not None
    run = simulator.start_run(segment, "-email")
    simulator._run_body(run, 37, 10_000)  # computes and caches the million-id order
    seconds = []
    for _ in range(20):
        began = time.perf_counter()
        JSONResponse(simulator._run_body(run, 37, 10_000))
        seconds.append(time.perf_counter() - began)
    spoiled_ms = statistics.median(seconds) * 1_000
    with capsys.disabled():
        print(f"\n10,000-id page with drift, a duplicate and ids cut: {spoiled_ms:.2f} ms to build and encode")
    assert spoiled_ms < 50
    assert simulator.stats()["faults_injected"] == {"total_drift": 21, "duplicate": 21, "short_page": 21}

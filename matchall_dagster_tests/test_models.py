"""Parsing the API's answers into records: the seed document's examples and broken bodies."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matchall_dagster import InvalidResponseError, RunState
from matchall_dagster.models import parse_error_details, parse_run, parse_segments

RUNNING = {
    "run_id": "744390a5-208e-4c3d-b709-b3c3ea6e5948",
    "run_id_start": "2020-04-12T23:20:50.523Z",
    "is_ready": False,
    "segment_id": "1ab85f0e-3b5c-4a35-bc07-242c68a7d195132",
    "segment_timestamp": "2020-04-12T23:20:49.5523Z",
}
READY = {
    **RUNNING,
    "run_id_end": "2020-04-12T23:20:53.523Z",
    "is_ready": True,
    "matches": [2345, 12, 234, 9837, 2317],
    "page": {"current_page": 1, "last_page": 1, "per_page": 20, "total": 5},
}


def body(attributes: dict[str, Any]) -> bytes:
    return json.dumps({"data": [{"id": "x-1", "type": "matchAll", "attributes": attributes}]}).encode()


def test_seed_examples_classify() -> None:
    running = parse_run(body(RUNNING))
    assert running.state is RunState.RUNNING
    assert not running.has_failed
    assert running.page is None
    ready = parse_run(body(READY))
    assert ready.state is RunState.READY
    assert ready.matches == [2345, 12, 234, 9837, 2317]
    assert ready.page is not None
    assert ready.page.total == 5
    failed = parse_run(body({**RUNNING, "run_id_end": "2020-04-12T23:20:53.523Z"}))
    assert failed.state is RunState.FAILED
    assert failed.has_failed


def test_numeric_segment_ids_are_kept_as_text() -> None:
    assert parse_run(body({**RUNNING, "segment_id": 42})).segment_id == "42"


@pytest.mark.parametrize(
    "broken",
    [
        b"",
        b"{",
        b'{"data": []}',
        b"<html>502</html>",
        body({**READY, "matches": [1, "x"]}),
        body({**READY, "matches": [0]}),
        body({**READY, "matches": [2**64]}),
        body({**READY, "page": {"current_page": 1, "last_page": 1, "per_page": 20, "total": -5}}),
        body({k: v for k, v in READY.items() if k != "run_id"}),
        body({**READY, "run_id_start": "yesterday"}),
    ],
)
def test_broken_bodies_raise_invalid_response(broken: bytes) -> None:
    with pytest.raises(InvalidResponseError, match="not what the contract promises"):
        parse_run(broken)


@given(st.binary(max_size=200))
def test_parser_never_raises_anything_but_invalid_response(data: bytes) -> None:
    with contextlib.suppress(InvalidResponseError):
        parse_run(data)


def test_truncating_a_valid_body_anywhere_is_detected() -> None:
    whole = body(READY)
    for cut in range(len(whole) - 1):
        with pytest.raises(InvalidResponseError):
            parse_run(whole[:cut])


def test_segments_and_their_total() -> None:
    raw = b'{"audiences": [{"id": 1, "name": "A", "last_total": "12"}], "meta": {"total": "1"}}'
    segments, total = parse_segments(raw)
    assert [(s.id, s.name, s.last_total) for s in segments] == [("1", "A", 12)]
    assert total == 1


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b'{"errors": "x"}', b"<html>"])
def test_error_bodies_of_any_shape_are_accepted(raw: bytes) -> None:
    assert parse_error_details(raw) == []


def test_error_details_with_varying_status_forms() -> None:
    raw = b'{"errors": [{"status": "404 NOT_FOUND", "title": "Not Found"}, {"status": 400, "detail": "d"}]}'
    details = parse_error_details(raw)
    assert [(d.status, d.title, d.detail) for d in details] == [
        ("404 NOT_FOUND", "Not Found", None),
        ("400", None, "d"),
    ]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
_FIELDS = st.sampled_from([*READY, "page", "current_page", "last_page", "per_page", "total", "data", "attributes"])


@st.composite
def _mutated_answers(draw: st.DrawFn) -> bytes:
    """A valid ready answer with some fields replaced by arbitrary JSON, or cut short."""
    attributes: dict[str, Any] = json.loads(json.dumps(READY))
    for _ in range(draw(st.integers(0, 4))):
        field = draw(_FIELDS)
        target = attributes["page"] if field in ("current_page", "last_page", "per_page", "total") else attributes
        if isinstance(target, dict):
            target[field] = draw(_JSON)
    whole = body(attributes)
    return whole[: draw(st.integers(0, len(whole)))] if draw(st.booleans()) else whole


@pytest.mark.campaign
@settings(max_examples=5_000, deadline=None)
@given(_mutated_answers() | _JSON.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=300))
def test_fuzz_the_parsers_raise_only_their_own_error(data: bytes) -> None:
    for parse in (parse_run, parse_segments):
        try:
            parsed = parse(data)
        except InvalidResponseError:
            continue
        if parse is parse_run:  # whatever parses keeps the contract's invariants
            run = parsed
            assert not isinstance(run, tuple)
            assert all(isinstance(i, int) and 1 <= i < 2**63 for i in run.matches or [])
            assert run.page is None or run.page.total >= 0
    parse_error_details(data)  # never raises

"""Parsing the API's answers into records: the seed document's examples and broken bodies."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matchall_dagster import InvalidResponseError, RunState
from matchall_dagster.api.models import (
    MatchAllRun,
    parse_error_details,
    parse_page,
    parse_run,
    parse_segments,
)

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


SUMMARY = {
    "id": "8094706",
    "type": "audience",
    "attributes": {
        "segment_id": "d2c5a14a-771d-4cc0-a126-3513a5201940",
        "category": "audience",
        "name": "Engaged",
        "counts": {
            "last_total": {
                "count": 1500,
                "last_total_updated": "2024-01-30T14:56:02.952Z",
                "run_id": "744390a5-208e-4c3d-b709-b3c3ea6e5948",
                "run_id_start": "2024-01-30T15:56:02.952Z",
                "run_id_end": "2024-01-30T15:56:04.952Z",
            },
            "last_active_total": {"count": 900},
        },
        "created_date": "2024-01-30T14:56:02.952Z",
        "updated_date": "2024-03-12T14:56:02.952Z",
        "last_used_date": "2025-07-13T14:56:02.952Z",
    },
}


def summaries(*items: dict[str, Any]) -> bytes:
    return json.dumps({"data": list(items)}).encode()


def test_a_summary_is_read_by_its_attributes_segment_id_never_its_own_id() -> None:
    (segment,) = parse_segments(summaries(SUMMARY))
    assert segment.id == "d2c5a14a-771d-4cc0-a126-3513a5201940"
    assert segment.name == "Engaged"
    assert segment.last_total == 1500
    assert segment.last_run is not None
    assert segment.last_run.run_id == "744390a5-208e-4c3d-b709-b3c3ea6e5948"
    assert segment.last_run.run_id_end is not None
    assert segment.last_run.run_id_start is not None
    assert segment.last_run.run_id_end - segment.last_run.run_id_start == timedelta(seconds=2)
    assert segment.updated_date is not None
    assert segment.created_date is not None
    assert segment.created_date < segment.updated_date


@pytest.mark.parametrize(
    ("counts", "last_total"),
    [({"last_total": {"count": 1500.0}}, 1500), ({"last_active_total": {"count": 3}}, None), (None, None)],
    ids=["a float of integral value", "no last_total", "no counts"],
)
def test_counts_are_a_number_and_may_be_missing(counts: dict[str, Any] | None, last_total: int | None) -> None:
    attributes = {"segment_id": "7"} | ({} if counts is None else {"counts": counts})
    (segment,) = parse_segments(summaries({"attributes": attributes}))
    assert segment.last_total == last_total
    assert isinstance(segment.last_total, int | None)


def test_an_empty_page_of_segments_is_an_empty_list() -> None:
    assert parse_segments(b'{"data": []}') == []


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (summaries({"id": "1", "attributes": {"name": "x"}}), "data.0.attributes.segment_id"),
        (summaries(SUMMARY, {"id": "2", "type": "audience"}), "data.1.attributes"),
        (summaries({"attributes": {"segment_id": "a/b"}}), "data.0.attributes.segment_id"),
        (
            summaries({"attributes": {"segment_id": "1", "counts": {"last_total": {"count": 1.5}}}}),
            "data.0.attributes.counts.last_total.count",
        ),
        (
            summaries({"attributes": {"segment_id": "1", "counts": {"last_total": {"count": -1}}}}),
            "data.0.attributes.counts.last_total.count",
        ),
        (summaries({"attributes": {"segment_id": "1", "created_date": "yesterday"}}), "data.0.attributes.created_date"),
        (b'{"audiences": [{"id": 1, "name": "A", "last_total": "12"}], "meta": {"total": "1"}}', "data"),
    ],
    ids=[
        "no segment_id",
        "no attributes",
        "a segment id we could not send",
        "a fraction",
        "negative",
        "no date",
        "old",
    ],
)
def test_a_broken_list_names_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidResponseError, match=rf"\({re.escape(field)}: "):
        parse_segments(raw)


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
        if isinstance(parsed, MatchAllRun):  # whatever parses keeps the contract's invariants
            assert all(isinstance(i, int) and 1 <= i < 2**63 for i in parsed.matches or [])
            assert parsed.page is None or parsed.page.total >= 0
        else:
            assert all(segment.last_total is None or segment.last_total >= 0 for segment in parsed)
    parse_error_details(data)  # never raises


# -- parse_page: the ids straight from the bytes, exactly as parse_run reads them -------------------

_ODD_IDS = st.sampled_from(
    [0, -1, 2**63 - 1, 2**63, 2**64, 10**18 - 1, 10**18, True, False, 1.0, 1.5, "7", None, [1], {"a": 1}]
)
_EDIT_CHARS = st.sampled_from(list('0123456789,[]":{} \\ue-.'))


def _page_outcome(data: bytes) -> object:
    try:
        run, ids = parse_page(data)
    except InvalidResponseError:
        return "invalid"
    assert ids is None or ids.dtype == np.int64
    return run, None if ids is None else ids.tolist()


def _run_outcome(data: bytes) -> object:
    try:
        run = parse_run(data)
    except InvalidResponseError:
        return "invalid"
    return run.model_copy(update={"matches": None}), run.matches


@st.composite
def _page_bodies(draw: st.DrawFn) -> bytes:
    """Pages as the API sends them, then bent: odd ids, a misplaced or escaped `matches` key, a second
    data item, spaces, and a few raw edits of the text (deleted, inserted or replaced characters)."""
    attributes: dict[str, Any] = json.loads(json.dumps(READY))
    matches: list[Any] = draw(st.lists(st.integers(1, 2**63 - 1) | st.integers(1, 10**7), max_size=40))
    for _ in range(draw(st.integers(0, 2))):
        matches.insert(draw(st.integers(0, len(matches))), draw(_ODD_IDS))
    attributes["matches"] = matches
    envelope: dict[str, Any] = {"data": [{"id": "x-1", "type": "matchAll", "attributes": attributes}]}
    shape = draw(st.integers(0, 5))
    if shape == 1:
        attributes["page"]["matches"] = attributes.pop("matches")  # the only `matches` is the wrong one
    elif shape == 2:
        envelope["data"].append({"attributes": {**attributes, "matches": [5, 6]}})
    elif shape == 3:
        del attributes["matches"]
    compact = draw(st.booleans())
    text = json.dumps(envelope, separators=(",", ":") if compact else (", ", ": "))
    if shape == 4:  # the same key spelled with an escape: JSON's last duplicate wins
        text = text.replace('"matches"', '"matche\\u0073":[9],"matches"', 1)
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(_EDIT_CHARS)
        if edit == "insert":
            text = text[:position] + char + text[position:]
        else:
            text = text[:position] + (char if edit == "replace" else "") + text[position + 1 :]
    return text.encode()


@settings(max_examples=400, deadline=None)
@given(_page_bodies())
def test_parse_page_reads_every_body_exactly_as_parse_run(data: bytes) -> None:
    assert _page_outcome(data) == _run_outcome(data)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"data":[{"attributes":{"run_id":"r","run_id_start":"2020-04-12T23:20:50Z","is_ready":true,'
        b'"segment_id":"1","matches":[1,2,3],"matche\\u0073":[4]}}]}',
        b'{"data":[{"attributes":{"run_id":"r","run_id_start":"2020-04-12T23:20:50Z","is_ready":true,'
        b'"segment_id":"1","matche\\u0073":[4],"matches":[1,2,3]}}]}',
        b'{"data":[{"attributes":{"run_id":"r","run_id_start":"2020-04-12T23:20:50Z","is_ready":true,'
        b'"segment_id":"1","matches":[1,2,3]}},{"attributes":{"matches":[4]}}]}',
        b'{"data":[{"attributes":{"run_id":"r","run_id_start":"2020-04-12T23:20:50Z","is_ready":true,'
        b'"segment_id":"1","page":{"current_page":1,"last_page":1,"per_page":5,"total":3,"matches":[1]}}}]}',
        body({**READY, "matches": [1, 9223372036854775807, 2]}),
        body({**READY, "matches": [1, 9223372036854775808]}),
        body({**READY, "matches": [1, 0, 2]}),
        body({**READY, "matches": []}),
        body({**READY, "segment_id": 'a"matches":[1]'}),
        body(READY).replace(b"2345", b"02345"),
        body(READY).replace(b"2345, ", b"2345,,"),
    ],
)
def test_parse_page_agrees_with_parse_run_on_hostile_shapes(raw: bytes) -> None:
    assert _page_outcome(raw) == _run_outcome(raw)


def test_parse_page_rejects_every_truncation() -> None:
    whole = body(READY).replace(b", ", b",").replace(b": ", b":")
    for cut in range(len(whole) - 1):
        with pytest.raises(InvalidResponseError):
            parse_page(whole[:cut])


@pytest.mark.parametrize(
    ("ids", "location"),
    [
        ([11, 12, 13, 0], "data.0.attributes.matches.3"),
        ([11, True], "data.0.attributes.matches.1"),
        ([11, "1_2"], "data.0.attributes.matches.1"),
        ([2**63], "data.0.attributes.matches.0"),
        ([1.0], "data.0.attributes.matches.0"),
        ("1,2", "data.0.attributes.matches"),
    ],
)
def test_a_bad_id_is_named_by_its_place(ids: object, location: str) -> None:
    compact = json.dumps({"data": [{"attributes": {**READY, "matches": ids}}]}, separators=(",", ":")).encode()
    with pytest.raises(InvalidResponseError, match=rf"not what the contract promises \({re.escape(location)}: "):
        parse_page(compact)


def test_every_items_ids_are_checked_and_the_first_items_are_returned() -> None:
    second = {**READY, "matches": [5, 0]}
    raw = json.dumps({"data": [{"attributes": READY}, {"attributes": second}]}).encode()
    with pytest.raises(InvalidResponseError, match=r"data\.1\.attributes\.matches\.1: "):
        parse_page(raw)
    second["matches"] = [5, 6]
    run, ids = parse_page(json.dumps({"data": [{"attributes": READY}, {"attributes": second}]}).encode())
    assert ids is not None
    assert ids.tolist() == READY["matches"]
    assert run.matches is None


def test_of_duplicate_matches_keys_the_last_counts_as_in_parse_run() -> None:
    """JSON's last duplicate key wins in pydantic; msgspec must read the ids the same way."""
    text = json.dumps({"data": [{"attributes": READY}]}, separators=(",", ":"))
    raw = text.replace('"matches":', '"matches":[0,true],"matches":', 1).encode()
    _, ids = parse_page(raw)
    assert ids is not None
    assert ids.tolist() == READY["matches"] == parse_run(raw).matches

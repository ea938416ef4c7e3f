"""The input rules shared by the client and the simulator, by example and by property."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from matchall_dagster import InvalidInputError
from matchall_dagster.api.validation import (
    parse_sort,
    validate_api_url,
    validate_id,
    validate_page_size,
    validate_sort,
)

SAFE = string.ascii_letters + string.digits + "-_.~"


@pytest.mark.parametrize("value", ["1", "42", "1ab85f0e-3b5c-4a35-bc07-242c68a7d195132", "a.b_c~d", "x" * 128])
def test_real_ids_pass_unchanged(value: str) -> None:
    assert validate_id(value) == value


@given(st.text(alphabet=SAFE, min_size=1, max_size=128).filter(lambda s: s[0].isalnum() and ".." not in s))
def test_every_id_of_safe_characters_passes(value: str) -> None:
    assert validate_id(value) == value


@given(st.text(min_size=1, max_size=40).filter(lambda s: any(c not in SAFE for c in s)))
def test_any_id_with_another_character_is_refused(value: str) -> None:
    with pytest.raises(InvalidInputError, match="segment id"):
        validate_id(value)


def test_error_messages_are_short_even_for_huge_input() -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_id("/" * 100)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("sort", "keys"),
    [
        ("id", ["id"]),
        ("-phone", ["-phone"]),
        ("score", ["score"]),
        ("score2", ["score2"]),
        ("-field9", ["-field9"]),
        ("last_name,-first_name", ["last_name", "-first_name"]),
        ("account_name,udate,-cdate,full_name,email", ["account_name", "udate", "-cdate", "full_name", "email"]),
    ],
)
def test_sorts_of_the_reference_parse(sort: str, keys: list[str]) -> None:
    assert [str(key) for key in parse_sort(sort)] == keys
    assert validate_sort(sort) == sort


def test_a_bare_field_is_refused() -> None:
    for sort in ("field", "-field", "id,field"):
        with pytest.raises(InvalidInputError, match="unknown key"):
            parse_sort(sort)


@given(st.text(max_size=30))
def test_sort_parser_never_crashes_and_round_trips(sort: str) -> None:
    try:
        keys = parse_sort(sort)
    except InvalidInputError:
        return
    assert ",".join(map(str, keys)) == sort


@given(st.integers())
def test_page_sizes_from_1_to_10000_only(size: int) -> None:
    if 1 <= size <= 10_000:
        assert validate_page_size(size) == size
    else:
        with pytest.raises(InvalidInputError, match="1 to 10,000"):
            validate_page_size(size)


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://acct.api-us1.com", "https://acct.api-us1.com"),
        ("https://acct.api-us1.com/", "https://acct.api-us1.com"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
        ("http://localhost:1", "http://localhost:1"),
        ("http://[::1]:8765/", "http://[::1]:8765"),
    ],
)
def test_api_urls_accepted(url: str, normalised: str) -> None:
    assert validate_api_url(url) == normalised


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("acct.api-us1.com", "not an http"),
        ("ftp://acct.api-us1.com", "not an http"),
        ("http://acct.api-us1.com", "plain http"),
        ("http://10.0.0.1", "plain http"),
        ("https://acct.api-us1.com/api/3", "path"),
        ("https://acct.api-us1.com?x=1", "path, query"),
        ("https://user:pw@acct.api-us1.com", "user name or password"),
    ],
)
def test_api_urls_refused(url: str, problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem) as caught:
        validate_api_url(url)
    assert "pw" not in str(caught.value)

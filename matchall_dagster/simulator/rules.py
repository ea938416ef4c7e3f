"""The API's paths and query rules, read from the published documents (`matchall_dagster.contract`).

Paging bounds and defaults, sort enums and grammar, and the `instant` flag come from the
documents, never from the client's validation: the two must each follow the contract, not each
other. Where the documents are silent a guess is made and marked "Guess:". The functions take a
request's query parameters as a mapping, so that no web framework is needed to test them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from matchall_dagster import contract

START = "/api/3/segmentMatchAll/{segmentId}"
RESULT_SET = "/api/3/segmentMatchAll/{segmentId}/{runId}"
MATCH_SOME = "/api/3/segmentMatchSome/{segmentId}/{runId}"
AUDIENCES = "/api/3/audiences"
AUDIENCE = "/api/3/audiences/{segmentId}"


class BadParameterError(Exception):
    """A query parameter the documents refuse; the app answers it 400, pointing at `name`."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(detail)
        self.name = name


def _bound(schema: Mapping[str, Any] | None, key: str) -> int | None:
    value = (schema or {}).get(key)
    return None if value is None else int(value)


@dataclass(frozen=True)
class Rules:
    """The query rules of one operation, read once from its published parameters."""

    page_default: int
    page_minimum: int | None
    size_default: int
    size_minimum: int | None
    size_maximum: int | None
    sort_default: str | None = None
    sort_enum: frozenset[str] | None = None  # the audiences' closed list
    sort_grammar: re.Pattern[str] | None = None  # the match-all keys, comma-separated
    instant_values: frozenset[str] | None = None

    @classmethod
    def of(cls, path: str) -> Rules:
        page = contract.parameter(path, "page")
        size = contract.parameter(path, "page_size")
        sort = contract.parameter(path, "sort")
        instant = contract.parameter(path, "instant")
        listed = sort is not None and contract.sort_is_a_list(path)
        grammar = re.compile(contract.sort_grammar(path)) if listed else None
        return cls(
            # Guess: audiences' `page` has a minimum but no default; like the others it starts at 1.
            page_default=_bound(page, "default") or 1,
            page_minimum=_bound(page, "minimum"),
            size_default=_bound(size, "default") or 20,
            size_minimum=_bound(size, "minimum"),
            size_maximum=_bound(size, "maximum"),
            sort_default=None if sort is None else str(sort.get("default", "")),
            sort_enum=None if sort is None or grammar is not None else frozenset(sort["enum"]),
            sort_grammar=grammar,
            instant_values=None if instant is None else frozenset(instant.get("enum", ())),
        )


def int_param(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    # Whole numbers only, within the int32 the answer's PageDO can echo.
    if not re.fullmatch(r"-?[0-9]{1,10}", raw) or not -(2**31) <= int(raw) < 2**31:
        raise BadParameterError(name, f"{name} must be an integer, not {raw[:40]!r}")
    return int(raw)


def sort_param(query: Mapping[str, str], rules: Rules) -> str:
    sort = query.get("sort")
    if sort is None:
        return rules.sort_default or ""
    if rules.sort_grammar is not None:
        allowed = rules.sort_grammar.fullmatch(sort) is not None
        wanted = "comma-separated keys of the documented sort enum, each optionally prefixed with '-'"
    else:
        allowed = sort in (rules.sort_enum or ())
        wanted = "one of " + ", ".join(sorted(rules.sort_enum or ()))
    if not allowed:
        raise BadParameterError("sort", f"sort {sort[:60]!r} is not {wanted}")
    return sort


def paging(query: Mapping[str, str], rules: Rules) -> tuple[int, int]:
    page = int_param(query, "page", rules.page_default)
    page_size = int_param(query, "page_size", rules.size_default)
    # A published minimum is enforced (400); where none is published (the match-all endpoints)
    # the API's paginator reads a page below 1 as 1 and a size below 1 as the default.
    if rules.page_minimum is not None and page < rules.page_minimum:
        raise BadParameterError("page", f"page must be at least {rules.page_minimum}, not {page}")
    if rules.size_minimum is not None and page_size < rules.size_minimum:
        raise BadParameterError("page_size", f"page_size must be at least {rules.size_minimum}, not {page_size}")
    if rules.size_maximum is not None and page_size > rules.size_maximum:
        raise BadParameterError("page_size", f"page_size must be at most {rules.size_maximum}, not {page_size}")
    return max(1, page), page_size if page_size >= 1 else rules.size_default


def instant_flag(query: Mapping[str, str], rules: Rules) -> bool:
    """Whether `instant` was sent. The documents' enum for it is [""]: a flag with no value.
    Guess: another value is refused (400) rather than read as the flag, so that a client
    sending `instant=1` (what the words "present = return at once" invite) hears of it."""
    value = query.get("instant")
    if value is None:
        return False
    if rules.instant_values is not None and value not in rules.instant_values:
        raise BadParameterError("instant", f"instant takes no value (send 'instant='), not {value[:40]!r}")
    return True

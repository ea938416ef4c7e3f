"""Checks on everything we put into a request, done before anything is sent.

These are the client's rules, stricter than the contract where it is loose (ids, repeated sort
keys). The simulator does not use them: it takes its rules from the published documents
(`matchall_dagster.contract`), so that client and simulator each follow the contract, not each other.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import httpx

from matchall_dagster.api.errors import InvalidInputError

MAX_PAGE_SIZE = 10_000
MAX_ID_LENGTH = 128
DEFAULT_SORT = "id"

# Ids are UUID-like strings or decimal numbers. Allowing only unreserved URL characters keeps
# path traversal, query/fragment injection, control characters and look-alike letters out.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]*")
_SORT_FIELDS = frozenset(
    {
        "id",
        "email",
        "phone",
        "first_name",
        "last_name",
        "full_name",
        "cdate",
        "udate",
        "account_name",
    }
)
_NUMBERED_SORT_FIELD = re.compile(r"(score)([0-9]{0,9})|(field)([0-9]{1,9})")


def _shown(value: str) -> str:
    """A safe, short rendering of user input for an error message."""
    return repr(value if len(value) <= 60 else value[:60] + "...")


def validate_id(value: object, what: str = "segment id") -> str:
    if not isinstance(value, str):
        raise InvalidInputError(
            f"The {what} must be a string, not {type(value).__name__}; pass it as text, "
            f"exactly as ActiveCampaign shows it."
        )
    if not value:
        raise InvalidInputError(f"The {what} is empty; pass the id ActiveCampaign shows.")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(
            f"The {what} is {len(value)} characters long; ActiveCampaign ids are at most "
            f"{MAX_ID_LENGTH}. Check that you passed an id and not something else."
        )
    if ".." in value or not _ID_PATTERN.fullmatch(value):
        raise InvalidInputError(
            f"The {what} {_shown(value)} is not a valid ActiveCampaign id: ids are numbers or "
            f"UUID-like strings of ASCII letters, digits and '-', '_', '.', '~' (no '/', '..', "
            f"spaces or control characters). Copy the id again from ActiveCampaign."
        )
    return value


@dataclass(frozen=True)
class SortKey:
    field: str
    descending: bool = False

    def __str__(self) -> str:
        return ("-" if self.descending else "") + self.field


def parse_sort(sort: object) -> tuple[SortKey, ...]:
    """Parse API.md's sort grammar: comma-separated keys, each optionally prefixed with '-'.

    A bare `field` (no custom field id), which the seed document's enum lists but whose meaning is
    undefined, is refused: the client never sends it.
    """
    if not isinstance(sort, str):
        raise InvalidInputError(
            f"The sort must be a string such as 'id' or 'last_name,-first_name', not {type(sort).__name__}."
        )
    if not sort:
        raise InvalidInputError("The sort is empty; leave it out to sort by 'id', or give keys such as 'email,-cdate'.")
    keys: list[SortKey] = []
    for raw in sort.split(","):
        descending = raw.startswith("-")
        name = raw[1:] if descending else raw
        numbered = _NUMBERED_SORT_FIELD.fullmatch(name)
        if name not in _SORT_FIELDS and numbered is None:
            allowed = ", ".join(sorted(_SORT_FIELDS))
            raise InvalidInputError(
                f"The sort {_shown(sort)} has an unknown key {_shown(raw)}. Use comma-separated "
                f"keys without spaces, each optionally prefixed with '-' for descending, from: "
                f"{allowed}, score, score<id> (e.g. score2), field<id> (e.g. field9)."
            )
        if any(key.field == name for key in keys):
            raise InvalidInputError(f"The sort {_shown(sort)} names {name!r} twice; give each key once.")
        keys.append(SortKey(name, descending))
    return tuple(keys)


def validate_sort(sort: object) -> str:
    parse_sort(sort)
    assert isinstance(sort, str)
    return sort


def validate_page(page: object, what: str = "page") -> int:
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise InvalidInputError(f"The {what} must be a whole number of at least 1, not {page!r}.")
    return page


def validate_page_size(page_size: object) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"The page size must be a whole number from 1 to {MAX_PAGE_SIZE:,}, not {page_size!r}.")
    return page_size


def validate_api_key(api_key: object) -> str:
    """The key must travel as one header value; the message says what is wrong, never what it is."""
    if not isinstance(api_key, str) or not api_key.strip():
        raise InvalidInputError(
            "The API key is empty. Set ACTIVECAMPAIGN_API_KEY to the key shown in "
            "ActiveCampaign under Settings > Developer."
        )
    if not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise InvalidInputError(
            "The API key (ACTIVECAMPAIGN_API_KEY) holds spaces, line breaks or non-ASCII characters, so "
            "it cannot be sent as a header; copy it again from Settings > Developer, without surrounding "
            "whitespace."
        )
    return api_key


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_api_url(api_url: object) -> str:
    """The account's API URL: https (plain http only to loopback, for the simulator), no path.

    Returns it normalised without a trailing slash.
    """
    hint = "Copy it from ActiveCampaign under Settings > Developer, e.g. https://youraccount.api-us1.com"
    if not isinstance(api_url, str) or not api_url.strip():
        raise InvalidInputError(f"The API URL is empty. {hint} (ACTIVECAMPAIGN_API_URL).")
    if "@" in api_url:
        # Never echo the URL here: its user-info may hold a password.
        raise InvalidInputError(
            "The API URL carries a user name or password; remove them. The API token goes in "
            "ACTIVECAMPAIGN_API_KEY, never in the URL."
        )
    try:
        url = httpx.URL(api_url.strip())
    except httpx.InvalidURL as exc:
        raise InvalidInputError(
            f"The API URL cannot be parsed ({exc}); it is not shown, as it may hold a key. {hint}."
        ) from None
    shown = _shown(str(url.copy_with(query=None, fragment=None)))  # a query may hold a key (v1 URLs did)
    if url.scheme not in ("https", "http") or not url.host:
        raise InvalidInputError(f"The API URL {shown} is not an http(s) URL with a host. {hint}.")
    if url.userinfo:
        # Never echo the URL here: its user-info may hold a password.
        raise InvalidInputError(
            "The API URL carries a user name or password; remove them. The API token goes in "
            "ACTIVECAMPAIGN_API_KEY, never in the URL."
        )
    if url.scheme == "http" and not is_loopback_host(url.host):
        raise InvalidInputError(
            f"The API URL {shown} uses plain http to {url.host!r}; the token would travel "
            f"unencrypted. Use https (plain http is accepted only for 127.0.0.1/localhost, the simulator)."
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise InvalidInputError(f"The API URL has port {url.port}; ports run from 1 to 65535. {hint}.")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise InvalidInputError(
            f"The API URL {shown} has a path, query or fragment (not shown: it may hold a key); give "
            f"the account's base URL only (the client adds /api/3/...). {hint}."
        )
    return str(url.copy_with(path="/")).rstrip("/")

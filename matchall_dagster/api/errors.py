"""One exception tree for everything that can go wrong talking to the Match-All API.

Every message says what happened and what to do about it, and none ever carries the API token:
messages are built only from our own words, ids we validated, HTTP status codes and the API's
`errors[].title/detail` fields (truncated), never from request headers.
"""

from __future__ import annotations

__all__ = [
    "APIUnavailableError",
    "ActiveCampaignError",
    "AuthenticationError",
    "BadRequestError",
    "BudgetStoreError",
    "InconsistentResultError",
    "InvalidInputError",
    "InvalidResponseError",
    "RunExpiredError",
    "RunFailedError",
    "RunNotReadyError",
    "SegmentNotFoundError",
    "UnexpectedResponseError",
]


class ActiveCampaignError(Exception):
    """Base of every error raised by the client; catch this to handle them all."""


class InvalidInputError(ActiveCampaignError, ValueError):
    """Input we can check ourselves was wrong; no request was sent."""


class BudgetStoreError(ActiveCampaignError):
    """The store of the account's request budget cannot be used; nothing was sent unmetered."""


class AuthenticationError(ActiveCampaignError):
    """401/403: the API token is missing, wrong or revoked (or the account is suspended)."""


class BadRequestError(ActiveCampaignError):
    """400: the API refused the request; the message carries its error detail."""


class SegmentNotFoundError(ActiveCampaignError):
    """404 on starting a run: no saved segment has that id in this account."""


class RunExpiredError(ActiveCampaignError):
    """404 on reading a run: it expired (90 days after its start) or never existed."""


class RunFailedError(ActiveCampaignError):
    """The run ended (`run_id_end` is set) without becoming ready; it will never finish."""


class RunNotReadyError(ActiveCampaignError):
    """The run was not ready in time, or turned not-ready while its pages were read."""


class InconsistentResultError(ActiveCampaignError):
    """Pages of one result-set disagree (total, paging, duplicates); the list would be wrong."""


class UnexpectedResponseError(ActiveCampaignError):
    """An answer we do not know how to use (a redirect, an undocumented status code)."""


class APIUnavailableError(ActiveCampaignError):
    """Retryable failures (429, 5xx, network, time-outs) outlasted the retry budget."""


class InvalidResponseError(APIUnavailableError):
    """The body was not the JSON the contract promises (often a truncated response)."""

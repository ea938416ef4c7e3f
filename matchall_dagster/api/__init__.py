"""The Match-All API client, with no Dagster import.

`client` holds the endpoints, `transport` the request gate (rate limit, retries, status to error),
`paging` the snapshot rules of a run's pages, `models` the records parsed from answers, `config`
the client's settings, `errors` the one exception tree, `validation` the checks on what we send.
"""

from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.api.config import ClientConfig
from matchall_dagster.api.errors import (
    ActiveCampaignError,
    APIUnavailableError,
    AuthenticationError,
    BadRequestError,
    InconsistentResultError,
    InvalidInputError,
    InvalidResponseError,
    RunExpiredError,
    RunFailedError,
    RunNotReadyError,
    SegmentNotFoundError,
    UnexpectedResponseError,
)
from matchall_dagster.api.models import MatchAllRun, PageInfo, RunState, RunStatus, Segment, SegmentCount
from matchall_dagster.api.paging import ContactIds, MatchList, MatchPage

__all__ = [
    "APIUnavailableError",
    "ActiveCampaignClient",
    "ActiveCampaignError",
    "AuthenticationError",
    "BadRequestError",
    "ClientConfig",
    "ContactIds",
    "InconsistentResultError",
    "InvalidInputError",
    "InvalidResponseError",
    "MatchAllRun",
    "MatchList",
    "MatchPage",
    "PageInfo",
    "RunExpiredError",
    "RunFailedError",
    "RunNotReadyError",
    "RunState",
    "RunStatus",
    "Segment",
    "SegmentCount",
    "SegmentNotFoundError",
    "UnexpectedResponseError",
]

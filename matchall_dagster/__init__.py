"""ActiveCampaign segment memberships as Dagster assets."""

from matchall_dagster.client import ActiveCampaignClient, MatchList, MatchPage
from matchall_dagster.errors import (
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
from matchall_dagster.models import MatchAllRun, PageInfo, RunState, RunStatus, Segment
from matchall_dagster.resource import ActiveCampaignResource

__all__ = [
    "APIUnavailableError",
    "ActiveCampaignClient",
    "ActiveCampaignError",
    "ActiveCampaignResource",
    "AuthenticationError",
    "BadRequestError",
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
    "SegmentNotFoundError",
    "UnexpectedResponseError",
]

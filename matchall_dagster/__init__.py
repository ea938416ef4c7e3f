"""ActiveCampaign segment memberships as Dagster assets."""

import warnings as _warnings
from typing import TYPE_CHECKING

from matchall_dagster.api.client import ActiveCampaignClient, MatchList, MatchPage
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
from matchall_dagster.api.models import MatchAllRun, PageInfo, RunState, RunStatus, Segment

if TYPE_CHECKING:
    from matchall_dagster.orchestration.resource import ActiveCampaignResource

# Known and accepted, so kept out of every process's log: partitioned asset checks are a preview
# of Dagster 1.13 (see the README), and Dagster's Definitions warns about a beta parameter that it
# passes to our sensors itself. Matched by message, so that this module need not import Dagster.
_warnings.filterwarnings("ignore", message="Specifying a partitions_def on an ")
_warnings.filterwarnings("ignore", message="Parameter `owners` of initializer `SensorDefinition.__init__`")


def __getattr__(name: str) -> object:
    # The resource imports Dagster (half a second); the client and the command line do not need it.
    if name == "ActiveCampaignResource":
        from matchall_dagster.orchestration.resource import ActiveCampaignResource

        return ActiveCampaignResource
    raise AttributeError(f"module 'matchall_dagster' has no attribute {name!r}")


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

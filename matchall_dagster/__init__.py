"""ActiveCampaign segment memberships as Dagster assets.

The public API: the client, its configuration, records and errors (no Dagster import), and the
Dagster resource, loaded on first use. Importing this package changes nothing process-wide.
"""

from typing import TYPE_CHECKING

from matchall_dagster.api import (
    ActiveCampaignClient,
    ActiveCampaignError,
    APIUnavailableError,
    AuthenticationError,
    BadRequestError,
    ClientConfig,
    ContactIds,
    InconsistentResultError,
    InvalidInputError,
    InvalidResponseError,
    MatchAllRun,
    MatchList,
    MatchPage,
    PageInfo,
    RunExpiredError,
    RunFailedError,
    RunNotReadyError,
    RunState,
    RunStatus,
    Segment,
    SegmentCount,
    SegmentNotFoundError,
    UnexpectedResponseError,
)

if TYPE_CHECKING:
    from matchall_dagster.component import MatchAllComponent
    from matchall_dagster.orchestration.resource import ActiveCampaignResource


def __getattr__(name: str) -> object:
    # The resource and the component import Dagster (half a second); the client and the command line do not.
    if name == "ActiveCampaignResource":
        from matchall_dagster.orchestration.resource import ActiveCampaignResource

        return ActiveCampaignResource
    if name == "MatchAllComponent":
        from matchall_dagster.component import MatchAllComponent

        return MatchAllComponent
    raise AttributeError(f"module 'matchall_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    # `dg list components` finds MatchAllComponent by listing this module (the registry entry point).
    return sorted(__all__)


__all__ = [
    "APIUnavailableError",
    "ActiveCampaignClient",
    "ActiveCampaignError",
    "ActiveCampaignResource",
    "AuthenticationError",
    "BadRequestError",
    "ClientConfig",
    "ContactIds",
    "InconsistentResultError",
    "InvalidInputError",
    "InvalidResponseError",
    "MatchAllComponent",
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

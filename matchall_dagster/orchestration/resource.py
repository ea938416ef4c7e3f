"""The Dagster resource: configuration only; the work is done by the client it builds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.api.config import (
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_PAGE_SIZE,
    DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_TIMEOUT,
    MaxConcurrentRequests,
    MaxRetries,
    PageSize,
    RequestsPerSecond,
    RetryBackoff,
    Timeout,
)

__all__ = ["ActiveCampaignResource"]


class ActiveCampaignResource(dg.ConfigurableResource["ActiveCampaignResource"]):
    """ActiveCampaign's Segments Match-All API for one account.

    Configure secrets with `EnvVar`, e.g.
    `ActiveCampaignResource(api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"),
    api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY"))`.
    """

    api_url: str = Field(
        description="The account's whole API URL from Settings > Developer, e.g. "
        "https://youraccount.api-us1.com (plain http only to a loopback simulator)."
    )
    api_key: str = Field(description="The account's API key; set it with EnvVar, never inline.", repr=False)
    # Bounds, defaults and descriptions are the client's own (api/config.py), declared once.
    request_timeout: Timeout = DEFAULT_TIMEOUT
    max_retries: MaxRetries = DEFAULT_MAX_RETRIES
    retry_backoff: RetryBackoff = DEFAULT_RETRY_BACKOFF
    requests_per_second: RequestsPerSecond = DEFAULT_REQUESTS_PER_SECOND
    page_size: PageSize = DEFAULT_PAGE_SIZE
    max_concurrent_requests: MaxConcurrentRequests = DEFAULT_MAX_CONCURRENT_REQUESTS

    def build_client(
        self,
        *,
        requests_per_second: float | None = None,
        max_retries: int | None = None,
        request_timeout: float | None = None,
    ) -> ActiveCampaignClient:
        """A new client; close it when done (or use `get_client`).

        The overrides are for callers with other needs than runs: the sensors hold another share
        of the account's limit, and must give up sooner to stay within a tick.
        """
        return ActiveCampaignClient(
            self.api_url,
            self.api_key,
            timeout=request_timeout or self.request_timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            retry_backoff=self.retry_backoff,
            requests_per_second=requests_per_second or self.requests_per_second,
            page_size=self.page_size,
            max_concurrent_requests=self.max_concurrent_requests,
        )

    @contextmanager
    def get_client(
        self,
        *,
        requests_per_second: float | None = None,
        max_retries: int | None = None,
        request_timeout: float | None = None,
    ) -> Iterator[ActiveCampaignClient]:
        client = self.build_client(
            requests_per_second=requests_per_second, max_retries=max_retries, request_timeout=request_timeout
        )
        try:
            yield client
        finally:
            client.close()

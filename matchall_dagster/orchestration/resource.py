"""The Dagster resource: configuration only; the work is done by the client it builds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from matchall_dagster.api.budget import Priority, RequestBudget, request_budget
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
from matchall_dagster.settings import settings

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
    request_budget: str | None = Field(
        default=None,
        description="Where the account's request budget lives (`memory`, a SQLite file, `postgresql://...`); "
        "every process of the deployment must name the same one. Default: MATCHALL_REQUEST_BUDGET, else a "
        "file in DAGSTER_HOME.",
    )

    def budget(self, priority: Priority = Priority.BULK) -> RequestBudget:
        """The account's request budget at `priority` (sensors: `DUE`; runs: `BULK`)."""
        return request_budget(
            self.request_budget or settings().budget_store(), self.api_url, self.requests_per_second, priority
        )

    def build_client(
        self,
        *,
        priority: Priority = Priority.BULK,
        max_retries: int | None = None,
        request_timeout: float | None = None,
        max_concurrent_requests: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ActiveCampaignClient:
        """A new client taking from the account's budget; close it when done (or use `get_client`).

        The overrides are for the sensors: their requests are due first, and they give up sooner
        to stay within a tick.
        """
        return ActiveCampaignClient(
            self.api_url,
            self.api_key,
            timeout=request_timeout or self.request_timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            retry_backoff=self.retry_backoff,
            requests_per_second=self.requests_per_second,
            page_size=self.page_size,
            max_concurrent_requests=max_concurrent_requests or self.max_concurrent_requests,
            budget=self.budget(priority),
            sleep=sleep,
        )

    @contextmanager
    def get_client(
        self,
        *,
        priority: Priority = Priority.BULK,
        max_retries: int | None = None,
        request_timeout: float | None = None,
    ) -> Iterator[ActiveCampaignClient]:
        client = self.build_client(priority=priority, max_retries=max_retries, request_timeout=request_timeout)
        try:
            yield client
        finally:
            client.close()

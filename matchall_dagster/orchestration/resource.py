"""The Dagster resource: configuration only; the work is done by the client it builds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.api.validation import MAX_PAGE_SIZE

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
    request_timeout: float = Field(default=30.0, gt=0, description="Seconds before one request times out.")
    max_retries: int = Field(
        default=6, ge=0, le=20, description="Retries of one request on 429, 5xx, network faults and bad bodies."
    )
    retry_backoff: float = Field(
        default=0.5, ge=0, description="Seconds before the first retry; doubles with each further one (up to 30 s)."
    )
    requests_per_second: float = Field(
        default=5.0,
        gt=0,
        le=1000,
        description="This process's share of the account's limit (5/s for the whole account, shared by "
        "every key and process).",
    )
    page_size: int = Field(default=MAX_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="Contact ids per page.")
    max_concurrent_requests: int = Field(
        default=8, ge=1, le=64, description="Pages fetched at once, so that latency does not leave the limit unused."
    )

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

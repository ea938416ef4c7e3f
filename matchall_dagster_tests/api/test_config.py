"""The client's configuration: one declaration of every bound, shared by the client and the resource."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pydantic
import pytest
from pydantic.fields import FieldInfo

from matchall_dagster import ActiveCampaignClient, ActiveCampaignResource, ClientConfig, InvalidInputError

# The resource's name of each client setting it offers (the rest are the client's alone).
RESOURCE_NAMES = {
    "timeout": "request_timeout",
    "max_retries": "max_retries",
    "retry_backoff": "retry_backoff",
    "requests_per_second": "requests_per_second",
    "page_size": "page_size",
    "max_concurrent_requests": "max_concurrent_requests",
}
CLIENT_ONLY = {"max_retry_wait"}


def _bounds(field: FieldInfo) -> dict[str, Any]:
    return {
        key: getattr(rule, key)
        for rule in field.metadata
        for key in ("ge", "gt", "le", "lt", "allow_inf_nan")
        if hasattr(rule, key)
    }


def test_every_setting_is_offered_by_the_resource_or_named_client_only() -> None:
    assert set(ClientConfig.model_fields) == set(RESOURCE_NAMES) | CLIENT_ONLY


@pytest.mark.parametrize(("name", "resource_name"), RESOURCE_NAMES.items())
def test_the_resource_and_the_client_share_each_bound_default_and_description(name: str, resource_name: str) -> None:
    client_field = ClientConfig.model_fields[name]
    resource_field = ActiveCampaignResource.model_fields[resource_name]
    assert _bounds(resource_field) == _bounds(client_field)
    assert _bounds(client_field), f"{name} has no bounds"
    assert resource_field.default == client_field.default
    assert resource_field.annotation is client_field.annotation
    assert resource_field.description == client_field.description
    assert resource_field.title == client_field.title
    assert client_field.description


def test_the_clients_keyword_defaults_are_the_configs() -> None:
    client = ActiveCampaignClient("https://acct.api-us1.com", "k")
    assert client.config == ClientConfig()
    client.close()


INVALID: list[tuple[str, object, str]] = [
    ("timeout", 0, "The request timeout (timeout) must be a finite number above 0, not 0"),
    ("timeout", math.nan, "The request timeout (timeout) must be a finite number above 0, not nan"),
    ("timeout", "30", "The request timeout (timeout) must be a finite number above 0, not '30'"),
    ("max_retries", -1, "The number of retries (max_retries) must be a whole number from 0 to 20, not -1"),
    ("max_retries", 21, "The number of retries (max_retries) must be a whole number from 0 to 20, not 21"),
    ("max_retries", True, "The number of retries (max_retries) must be a whole number from 0 to 20, not True"),
    ("max_retries", 1.5, "The number of retries (max_retries) must be a whole number from 0 to 20, not 1.5"),
    ("max_retry_wait", -1.0, "The longest retry wait (max_retry_wait) must be a finite number of at least 0, not -1.0"),
    ("retry_backoff", -0.5, "The retry backoff (retry_backoff) must be a finite number of at least 0, not -0.5"),
    (
        "requests_per_second",
        0,
        "The request rate (requests_per_second) must be a finite number above 0 and at most 1,000, not 0",
    ),
    (
        "requests_per_second",
        1001,
        "The request rate (requests_per_second) must be a finite number above 0 and at most 1,000, not 1001",
    ),
    ("page_size", 0, "The page size (page_size) must be a whole number from 1 to 10,000, not 0"),
    ("page_size", 10_001, "The page size (page_size) must be a whole number from 1 to 10,000, not 10001"),
    (
        "max_concurrent_requests",
        65,
        "The number of concurrent requests (max_concurrent_requests) must be a whole number from 1 to 64, not 65",
    ),
]


@pytest.mark.parametrize(("name", "value", "message"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_a_bad_setting_is_refused_naming_it_and_what_it_takes(name: str, value: object, message: str) -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    settings: dict[str, Any] = {name: value}
    with pytest.raises(InvalidInputError) as refused:
        ActiveCampaignClient("https://acct.api-us1.com", "k3y", transport=httpx.MockTransport(answer), **settings)
    text = str(refused.value)
    assert text.startswith(message + ". ")
    assert text.endswith(str(ClientConfig.model_fields[name].description))  # and what the setting is for
    assert "k3y" not in text
    assert sent == []


# Out of range for the resource too; type mistakes ("30", True) are Dagster's config's to refuse.
OUT_OF_RANGE = [
    (RESOURCE_NAMES[name], value)
    for name, value, _ in INVALID
    if name in RESOURCE_NAMES and not isinstance(value, str | bool)
]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE, ids=[f"{n}={v!r}" for n, v in OUT_OF_RANGE])
def test_the_resource_refuses_the_same_out_of_range_values(name: str, value: object) -> None:
    settings: dict[str, Any] = {name: value}
    with pytest.raises(pydantic.ValidationError, match=name):
        ActiveCampaignResource(api_url="https://acct.api-us1.com", api_key="k", **settings)


@pytest.mark.parametrize("name", list(ClientConfig.model_fields))
def test_each_bound_itself_is_allowed(name: str) -> None:
    bounds = _bounds(ClientConfig.model_fields[name])
    for key in ("ge", "le"):
        if key in bounds:
            value = bounds[key] if ClientConfig.model_fields[name].annotation is int else float(bounds[key])
            assert getattr(ClientConfig.of(**{name: value}), name) == value


def test_integers_are_taken_for_seconds_and_rates() -> None:
    config = ClientConfig.of(timeout=5, requests_per_second=2)
    assert config.timeout == 5.0
    assert isinstance(config.requests_per_second, float)


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="no setting 'retries'"):
        ClientConfig.of(retries=3)


def test_the_config_is_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        ClientConfig().max_retries = 3  # type: ignore[misc]

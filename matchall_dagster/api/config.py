"""The client's configuration, declared once: bounds, defaults and descriptions of every setting.

`ClientConfig` is what `ActiveCampaignClient` validates its arguments through, and the Dagster
resource declares its fields from the same `Annotated` types and defaults, so that a bound lives
in one place and the two cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from matchall_dagster.api.errors import InvalidInputError
from matchall_dagster.api.validation import MAX_PAGE_SIZE

__all__ = [
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MAX_RETRY_WAIT",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_REQUESTS_PER_SECOND",
    "DEFAULT_RETRY_BACKOFF",
    "DEFAULT_TIMEOUT",
    "ClientConfig",
    "MaxConcurrentRequests",
    "MaxRetries",
    "MaxRetryWait",
    "PageSize",
    "RequestsPerSecond",
    "RetryBackoff",
    "Timeout",
]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 6
DEFAULT_MAX_RETRY_WAIT = 120.0
DEFAULT_RETRY_BACKOFF = 0.5
DEFAULT_REQUESTS_PER_SECOND = 5.0
DEFAULT_PAGE_SIZE = MAX_PAGE_SIZE
DEFAULT_MAX_CONCURRENT_REQUESTS = 8

Timeout = Annotated[
    float,
    Field(
        title="request timeout",
        gt=0,
        allow_inf_nan=False,
        description="Seconds before one request times out; raise it on slow links.",
    ),
]
MaxRetries = Annotated[
    int,
    Field(
        title="number of retries",
        ge=0,
        le=20,
        description="Retries of one request on 429, 5xx, network faults and bad bodies; 0 never retries.",
    ),
]
MaxRetryWait = Annotated[
    float,
    Field(
        title="longest retry wait",
        ge=0,
        allow_inf_nan=False,
        description="The longest wait before a retry in seconds, a server's Retry-After included.",
    ),
]
RetryBackoff = Annotated[
    float,
    Field(
        title="retry backoff",
        ge=0,
        allow_inf_nan=False,
        description="Seconds before the first retry; doubles with each further one (up to 30 s).",
    ),
]
RequestsPerSecond = Annotated[
    float,
    Field(
        title="request rate",
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="The account's limit: requests per second for everything that calls it (5 for "
        "ActiveCampaign), kept in the request budget every process of the account shares.",
    ),
]
PageSize = Annotated[
    int, Field(title="page size", ge=1, le=MAX_PAGE_SIZE, description="Contact ids per page; the API allows 10,000.")
]
MaxConcurrentRequests = Annotated[
    int,
    Field(
        title="number of concurrent requests",
        ge=1,
        le=64,
        description="Pages fetched at once, so that latency does not leave the limit unused.",
    ),
]


class ClientConfig(BaseModel):
    """How one client talks to the API: time-outs, retries, the account's rate limit, paging.

    Strict: `True` is not a number of retries, nor "5" a rate. Build it with `of(...)` to have
    a mistake raised as `InvalidInputError` naming the argument and what it takes.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    timeout: Timeout = DEFAULT_TIMEOUT
    max_retries: MaxRetries = DEFAULT_MAX_RETRIES
    max_retry_wait: MaxRetryWait = DEFAULT_MAX_RETRY_WAIT
    retry_backoff: RetryBackoff = DEFAULT_RETRY_BACKOFF
    requests_per_second: RequestsPerSecond = DEFAULT_REQUESTS_PER_SECOND
    page_size: PageSize = DEFAULT_PAGE_SIZE
    max_concurrent_requests: MaxConcurrentRequests = DEFAULT_MAX_CONCURRENT_REQUESTS

    @classmethod
    def of(cls, **values: Any) -> ClientConfig:
        """The configuration of these arguments, or `InvalidInputError` about the first wrong one."""
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "?"
            if name not in cls.model_fields:
                raise InvalidInputError(f"ActiveCampaignClient takes no setting {name!r}.") from None
            field = cls.model_fields[name]
            raise InvalidInputError(
                f"The {field.title} ({name}) must be {_allowed(name)}, not {error['input']!r}. {field.description}"
            ) from None


def _allowed(name: str) -> str:
    """What a field takes, in words: 'a whole number from 0 to 20', 'a finite number above 0'."""
    field = ClientConfig.model_fields[name]
    kind = "a whole number" if field.annotation is int else "a finite number"
    bounds = {key: getattr(rule, key) for rule in field.metadata for key in ("ge", "gt", "le") if hasattr(rule, key)}
    if "ge" in bounds and "le" in bounds:
        return f"{kind} from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    parts = [kind]
    if "ge" in bounds:
        parts.append(f"of at least {_number(bounds['ge'])}")
    if "gt" in bounds:
        parts.append(f"above {_number(bounds['gt'])}")
    if "le" in bounds:
        parts.append(f"{'and ' if len(parts) > 1 else ''}at most {_number(bounds['le'])}")
    return " ".join(parts)


def _number(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"

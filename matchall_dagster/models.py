"""Typed records of the API's answers, parsed once at the client boundary.

Nothing past the client sees a raw dict: callers ask a `MatchAllRun` for its `state`, its
`page` or its `matches` instead.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from matchall_dagster.errors import InvalidResponseError
from matchall_dagster.validation import validate_id

__all__ = [
    "ApiErrorDetail",
    "MatchAllRun",
    "PageInfo",
    "RunState",
    "RunStatus",
    "Segment",
    "parse_error_details",
    "parse_run",
    "parse_segments",
]

_INT32_MAX = 2**31 - 1
# Strict: a `true` or a "1_2" in place of an id is a broken answer, not contact 1 or 12.
ContactId = Annotated[int, Field(ge=1, le=2**63 - 1, strict=True)]
# Segment ids become partition keys and path segments: the rules of the ids we send.
SegmentId = Annotated[str, AfterValidator(validate_id)]


class _Record(BaseModel):
    # Ids come as numbers or strings depending on the endpoint; we keep them as text.
    model_config = ConfigDict(frozen=True, coerce_numbers_to_str=True, extra="ignore")


class RunState(enum.Enum):
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"
    EXPIRED = "expired"  # 404: expired after 90 days, or never existed


class PageInfo(_Record):
    current_page: int = Field(ge=1, le=_INT32_MAX)
    last_page: int = Field(ge=0, le=_INT32_MAX)
    per_page: int = Field(ge=1, le=_INT32_MAX)
    total: int = Field(ge=0, le=_INT32_MAX)


class MatchAllRun(_Record):
    """One answer of a match-all call: the run's status and, when ready, one page of ids."""

    run_id: str = Field(min_length=1)
    run_id_start: datetime
    run_id_end: datetime | None = None
    is_ready: bool = Field(strict=True)
    segment_id: str
    segment_timestamp: datetime | None = None
    matches: list[ContactId] | None = None
    page: PageInfo | None = None

    @property
    def has_failed(self) -> bool:
        return not self.is_ready and self.run_id_end is not None

    @property
    def state(self) -> RunState:
        if self.is_ready:
            return RunState.READY
        return RunState.FAILED if self.run_id_end is not None else RunState.RUNNING


class RunStatus(_Record):
    """A run's state, with the run record when the API still knows the run."""

    state: RunState
    run: MatchAllRun | None = None


class _MatchAllData(_Record):
    attributes: MatchAllRun


class _MatchAllEnvelope(_Record):
    data: list[_MatchAllData] = Field(min_length=1)


class Segment(_Record):
    """A saved segment ("audience") of the account."""

    id: SegmentId
    name: str = ""
    last_total: int | None = Field(default=None, ge=0)


class _AudienceMeta(_Record):
    total: int = Field(ge=0)


class _AudiencesEnvelope(_Record):
    audiences: list[Segment]
    meta: _AudienceMeta | None = None


class ApiErrorDetail(_Record):
    status: str | None = None
    title: str | None = None
    detail: str | None = None
    code: str | None = None


class _ErrorEnvelope(_Record):
    errors: list[ApiErrorDetail] = []


def _invalid(what: str, exc: ValidationError) -> InvalidResponseError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return InvalidResponseError(
        f"The API's answer to {what} is not what the contract promises ({where}: {first['msg']}; "
        f"{exc.error_count()} problem(s)). This is usually a truncated response and is retried."
    )


def parse_run(body: bytes, what: str = "a match-all call") -> MatchAllRun:
    try:
        return _MatchAllEnvelope.model_validate_json(body).data[0].attributes
    except ValidationError as exc:
        raise _invalid(what, exc) from None


def parse_segments(body: bytes) -> tuple[list[Segment], int | None]:
    """Segments of one page of /audiences, with the account's total when the API sends it."""
    try:
        envelope = _AudiencesEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid("listing segments", exc) from None
    return envelope.audiences, envelope.meta.total if envelope.meta else None


def parse_error_details(body: bytes) -> list[ApiErrorDetail]:
    """The API's error details, or none: any JSON or an empty body is accepted for errors."""
    try:
        return _ErrorEnvelope.model_validate_json(body).errors
    except ValidationError:
        return []

"""Typed records of the API's answers, parsed once at the client boundary.

Nothing past the client sees a raw dict: callers ask a `MatchAllRun` for its `state`, its
`page` or its `matches` instead.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated

import msgspec
import numpy as np
import numpy.typing as npt
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from matchall_dagster.api.errors import InvalidResponseError
from matchall_dagster.api.validation import validate_id

__all__ = [
    "ApiErrorDetail",
    "MatchAllRun",
    "PageInfo",
    "RunState",
    "RunStatus",
    "Segment",
    "SegmentCount",
    "parse_error_details",
    "parse_page",
    "parse_run",
    "parse_segments",
]

_INT32_MAX = 2**31 - 1
CONTACT_ID_MIN, CONTACT_ID_MAX = 1, 2**63 - 1  # positive int64
# Strict: a `true` or a "1_2" in place of an id is a broken answer, not contact 1 or 12.
ContactId = Annotated[int, Field(ge=CONTACT_ID_MIN, le=CONTACT_ID_MAX, strict=True)]
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


class _RunRecord(_Record):
    """A run's fields but its ids: what `parse_page` validates with pydantic."""

    run_id: str = Field(min_length=1)
    run_id_start: datetime
    run_id_end: datetime | None = None
    is_ready: bool = Field(strict=True)
    segment_id: str
    segment_timestamp: datetime | None = None
    page: PageInfo | None = None


class MatchAllRun(_RunRecord):
    """One answer of a match-all call: the run's status and, when ready, one page of ids."""

    matches: list[ContactId] | None = None

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


class _PageData(_Record):
    attributes: _RunRecord


class _PageEnvelope(_Record):
    data: list[_PageData] = Field(min_length=1)


class SegmentCount(_Record):
    """A count of `counts` in a segment summary: the latest run's figure (cached, not live)."""

    count: int | None = Field(default=None, ge=0)  # published as `number`: 1500 and 1500.0 alike
    last_total_updated: datetime | None = None
    run_id: str | None = None
    run_id_start: datetime | None = None
    run_id_end: datetime | None = None


class _SegmentCounts(_Record):
    last_total: SegmentCount | None = None
    last_active_total: SegmentCount | None = None


class _SegmentAttributes(_Record):
    segment_id: SegmentId
    category: str | None = None
    name: str = ""
    counts: _SegmentCounts | None = None
    created_date: datetime | None = None
    updated_date: datetime | None = None
    last_used_date: datetime | None = None


class _SegmentItem(_Record):
    id: str | None = None  # the summary's own id, never the segment id (API.md)
    type: str | None = None
    attributes: _SegmentAttributes


class _SegmentsEnvelope(_Record):
    data: list[_SegmentItem]


class Segment(_Record):
    """A saved segment of the account, as `GET /api/3/audiences` summarises it.

    `id` is the item's `attributes.segment_id`, the id the match-all endpoints take; `last_total`
    and `last_run` come from `counts.last_total`: the latest run's count and run, a recent figure
    that a live read may differ from.
    """

    id: SegmentId
    name: str = ""
    last_total: int | None = None
    last_run: SegmentCount | None = None
    created_date: datetime | None = None
    updated_date: datetime | None = None
    last_used_date: datetime | None = None

    @classmethod
    def _of(cls, item: _SegmentItem) -> Segment:
        attributes = item.attributes
        last = attributes.counts.last_total if attributes.counts else None
        return cls(
            id=attributes.segment_id,
            name=attributes.name,
            last_total=last.count if last else None,
            last_run=last,
            created_date=attributes.created_date,
            updated_date=attributes.updated_date,
            last_used_date=attributes.last_used_date,
        )


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


# `parse_page` reads the ids with msgspec into one list of ints, then one int64 array, and
# validates the record with pydantic without them: 10,000 ids as pydantic-validated Python ints cost
# twice as much. Both ids decoders hold the ids to the rule of `ContactId`.
_MsgspecContactId = Annotated[int, msgspec.Meta(ge=CONTACT_ID_MIN, le=CONTACT_ID_MAX)]


class _Ids(msgspec.Struct):
    matches: list[_MsgspecContactId] | None = None


class _IdsItem(msgspec.Struct):
    attributes: _Ids


class _IdsEnvelope(msgspec.Struct):
    data: list[_IdsItem]


# A body that one pass refuses is read again item by item, each item's `matches` as raw JSON first:
# of duplicate keys only the last counts, as in pydantic, and the error names the id's place.
class _RawIds(msgspec.Struct):
    matches: msgspec.Raw = msgspec.Raw(b"null")


class _RawIdsItem(msgspec.Struct):
    attributes: _RawIds


class _RawIdsEnvelope(msgspec.Struct):
    data: list[_RawIdsItem]


_IDS = msgspec.json.Decoder(_IdsEnvelope)
_RAW_IDS = msgspec.json.Decoder(_RawIdsEnvelope)
_ID_LIST = msgspec.json.Decoder(list[_MsgspecContactId] | None)
_MSGSPEC_PATH = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def parse_page(body: bytes, what: str = "a match-all call") -> tuple[MatchAllRun, npt.NDArray[np.int64] | None]:
    """A page as its record (without `matches`) and its ids as int64, exactly as `parse_run` reads it."""
    try:
        record = _PageEnvelope.model_validate_json(body).data[0].attributes
    except ValidationError as exc:
        raise _invalid(what, exc) from None
    try:
        ids = _IDS.decode(body).data[0].attributes.matches
    except (msgspec.ValidationError, msgspec.DecodeError):
        ids = _page_ids_item_by_item(body, what)
    run = MatchAllRun.model_construct(_fields_set=record.model_fields_set, **dict(record))
    return run, None if ids is None else np.array(ids, dtype=np.int64)


def _page_ids_item_by_item(body: bytes, what: str) -> list[int] | None:
    """data[0]'s ids, every item's checked as `parse_run` checks them; else the located error."""
    prefix = ""
    try:
        lists = []
        for number, item in enumerate(_RAW_IDS.decode(body).data):
            prefix = f"data.{number}.attributes.matches"
            lists.append(_ID_LIST.decode(item.attributes.matches))
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        message, _, path = str(exc).partition(" - at `")
        steps = [name or index for name, index in _MSGSPEC_PATH.findall(path)]
        where = ".".join([prefix, *steps] if prefix else steps) or "body"
        raise InvalidResponseError(
            f"The API's answer to {what} is not what the contract promises ({where}: {message}). "
            f"This is usually a truncated response and is retried."
        ) from None
    return lists[0]


def parse_segments(body: bytes) -> list[Segment]:
    """The segments of one page of `GET /api/3/audiences` (or of one `GET /audiences/{id}`)."""
    try:
        envelope = _SegmentsEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid("listing segments", exc) from None
    return [Segment._of(item) for item in envelope.data]


def parse_error_details(body: bytes) -> list[ApiErrorDetail]:
    """The API's error details, or none: any JSON or an empty body is accepted for errors."""
    try:
        return _ErrorEnvelope.model_validate_json(body).errors
    except ValidationError:
        return []

"""The segments partitions: one partition per tracked segment, keyed by its id as the API gives it."""

from __future__ import annotations

import os
from collections.abc import Iterable

import dagster as dg

from matchall_dagster.api.errors import InvalidInputError
from matchall_dagster.api.validation import validate_id

segments_partitions = dg.DynamicPartitionsDefinition(name="segments")

ALLOW_LIST_VARIABLE = "MATCHALL_SEGMENTS"


def allow_list() -> frozenset[str] | None:
    """The segment ids of MATCHALL_SEGMENTS (comma-separated), or None to track every segment."""
    raw = os.environ.get(ALLOW_LIST_VARIABLE, "").strip()
    if not raw:
        return None
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    for segment_id in ids:
        try:
            validate_id(segment_id)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{ALLOW_LIST_VARIABLE} lists a bad id: {exc}") from None
    return frozenset(ids)


def tracked(segment_ids: Iterable[str]) -> list[str]:
    """The given ids that the allow-list admits, in their order."""
    allowed = allow_list()
    return [segment_id for segment_id in segment_ids if allowed is None or segment_id in allowed]

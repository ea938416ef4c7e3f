"""The segments partitions: one partition per tracked segment, keyed by its id as the API gives it."""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from matchall_dagster.orchestration.names import SEGMENTS_PARTITIONS
from matchall_dagster.settings import settings

segments_partitions = dg.DynamicPartitionsDefinition(name=SEGMENTS_PARTITIONS)


def tracked(segment_ids: Iterable[str]) -> list[str]:
    """The given ids that the allow-list (MATCHALL_SEGMENTS) admits, in their order."""
    allowed = settings().segments
    return [segment_id for segment_id in segment_ids if allowed is None or segment_id in allowed]

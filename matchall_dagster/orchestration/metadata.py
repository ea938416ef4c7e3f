"""What the project writes as Dagster metadata besides its records (see `lifecycle.record`).

`run_metadata` describes the remote run behind a materialization or a check result; these keys
are the asset's output, shown in the UI and read back by the checks and `segment_membership_changes`
from the partition's latest materialization. The records the lifecycle reads back (pending runs,
deletions) live under the `matchall/` namespace in `lifecycle.record`.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from matchall_dagster.api.models import MatchAllRun

RUN_ID = "run_id"
SORT = "sort"
RUN_STARTED_AT = "run_started_at"
RUN_ENDED_AT = "run_ended_at"
SEGMENT_TIMESTAMP = "segment_timestamp"
SEGMENT_NAME = "segment_name"  # on a materialization: the name the catalog gave the segment
PAGE_TOTAL = "page_total"


def labelled(segment_id: str, name: str | None) -> str:
    """`segment 42 "VIP customers"` in log lines and descriptions; `segment 42` without a known name."""
    return f'segment {segment_id} "{name}"' if name else f"segment {segment_id}"


def run_metadata(run: MatchAllRun | None, run_id: str, sort: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {RUN_ID: run_id, SORT: sort}
    if run is not None:
        metadata[RUN_STARTED_AT] = dg.MetadataValue.timestamp(run.run_id_start)
        if run.run_id_end is not None:
            metadata[RUN_ENDED_AT] = dg.MetadataValue.timestamp(run.run_id_end)
        if run.segment_timestamp is not None:
            metadata[SEGMENT_TIMESTAMP] = dg.MetadataValue.timestamp(run.segment_timestamp)
    return metadata

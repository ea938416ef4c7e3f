"""A match-all run of the simulated account, and the page of it that an API answer carries."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from matchall_dagster.simulator.account import Behavior, ContactIds, SimAccount, SimSegment

# Spoils a ready page's ids in place (ordered ids, page, page size, the page's ids); returns the
# total the page tells. `Simulator` passes one when page faults are on.
PageSpoiler = Callable[[ContactIds, int, int, list[int]], int]


@dataclass
class SimRun:
    run_id: str
    segment: SimSegment
    sort: str
    started_at: float  # simulator clock, epoch seconds
    ready_at: float
    generation: int = 0  # the segment's membership this run computes (see SimSegment.churn)


def iso(epoch: float) -> str:
    """The API's time format: UTC with milliseconds and a Z, so that the text sorts as time does."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def run_body(
    account: SimAccount,
    run: SimRun,
    page: int,
    page_size: int,
    *,
    now: float,
    rekicked: bool = False,
    spoil: PageSpoiler | None = None,
) -> dict[str, Any]:
    """The JSON of a match-all answer: the run's state, and when it is ready one page of its ids."""
    finished = now >= run.ready_at and not rekicked
    ready = finished and run.segment.behavior is not Behavior.FAIL
    attributes: dict[str, Any] = {
        "run_id": run.run_id,
        "run_id_start": iso(run.started_at),
        "is_ready": ready,
        "segment_id": run.segment.id,
        "segment_timestamp": iso(account.segment_timestamp(run.segment).timestamp()),
    }
    if finished:
        attributes["run_id_end"] = iso(run.ready_at)
    if ready:
        ordered = account.ordered(run.segment.id, run.sort, run.generation)
        total = int(ordered.size)
        matches = ordered[(page - 1) * page_size : page * page_size].tolist()
        if spoil is not None:
            total = spoil(ordered, page, page_size, matches)
        attributes["matches"] = matches
        attributes["page"] = {
            "current_page": page,
            "last_page": max(1, math.ceil(total / page_size)),
            "per_page": page_size,
            "total": total,
        }
    return {"data": [{"id": f"{run.run_id}-{page}", "type": "matchAll", "attributes": attributes}]}

"""The saved segments' summaries (`/api/3/audiences`), and the guesses where the documents are silent.

What the companion document leaves open varies by segment and account, seeded, so that the client
meets every reading: each guess is written down where it is made ("Guess:").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from matchall_dagster.simulator.account import SimAccount, SimSegment, seed_of
from matchall_dagster.simulator.runs import SimRun, iso

# Guess: the item `type` of a summary is not published; each account answers one of these.
SUMMARY_TYPES = ("audience", "audiences", "segmentSummary")


class Facts(NamedTuple):
    """What a segment's summary says that does not depend on its runs: seeded, drawn once."""

    summary_id: str
    created: float
    updated: float
    last_used: float | None  # before any run
    counted: float  # when the count before any run was taken
    counts_before_runs: int  # 0: no `counts`; 1: `last_total` alone; 2: and `last_active_total`
    active_total: bool  # `last_active_total` sent once the segment has run
    active_share: float  # of the members, the active ones
    count_as_float: bool


def facts_of(account: SimAccount, segment: SimSegment) -> Facts:
    draw = seed_of(account.seed, segment.id, "summary")
    updated = account.segment_timestamp(segment).timestamp()
    created = updated - (draw >> 8) % (400 * 86_400)
    # Guess: the item's own `id` is a number of its own, never the segment id (API.md).
    summary_id = str(1_000 + (draw >> 20) % 9_000_000)
    if summary_id == segment.id:
        summary_id = str(int(summary_id) + 1)
    return Facts(
        summary_id=summary_id,
        created=created,
        updated=updated,
        # Guess: a segment never run may have been used (say, in a campaign) or never.
        last_used=None if (draw >> 44) % 3 == 0 else updated + (draw >> 46) % (30 * 86_400),
        counted=updated + (draw >> 2) % 86_400,
        counts_before_runs=(draw >> 60) % 3,
        active_total=bool(draw >> 62 & 1),
        active_share=0.5 + ((draw >> 50) % 501) / 1_000,
        count_as_float=bool(draw & 1),
    )


def summary(account: SimAccount, segment: SimSegment, facts: Facts, run: SimRun | None) -> dict[str, Any]:
    """A saved segment's summary as the companion document publishes it (a JSON:API item).

    What the document leaves open varies by segment, seeded: `counts.*.count` is a `number`,
    sent as an integer or as a float of integral value; before any run, `counts` is absent,
    or holds `last_total` with only count and date, or `last_active_total` beside it; after a
    run (`run`: the latest finished one), `last_total` is its count with its run id and times,
    and `last_active_total` (when sent) a seeded share of it with the same run.
    """

    def count(value: float) -> float | int:
        return float(round(value)) if facts.count_as_float else round(value)

    attributes: dict[str, Any] = {"segment_id": segment.id, "category": "audience", "name": segment.name}
    last_used = facts.last_used
    if run is not None:
        size = account.members(segment.id, run.generation).size if segment.evolves else segment.size
        last: dict[str, Any] = {
            "count": count(size),
            "last_total_updated": iso(run.ready_at),
            "run_id": run.run_id,
            "run_id_start": iso(run.started_at),
            "run_id_end": iso(run.ready_at),
        }
        counts = {"last_total": last}
        if facts.active_total:
            counts["last_active_total"] = {**last, "count": count(size * facts.active_share)}
        attributes["counts"] = counts
        last_used = max(run.started_at, last_used or run.started_at)
    elif facts.counts_before_runs:
        last = {"count": count(segment.size), "last_total_updated": iso(facts.counted)}
        counts = {"last_total": last}
        if facts.counts_before_runs == 2:
            counts["last_active_total"] = {**last, "count": count(segment.size * facts.active_share)}
        attributes["counts"] = counts
    attributes["created_date"] = iso(facts.created)
    attributes["updated_date"] = iso(facts.updated)
    if last_used is not None:
        attributes["last_used_date"] = iso(last_used)
    summary_type = SUMMARY_TYPES[seed_of(account.seed, "summary type") % len(SUMMARY_TYPES)]
    return {"id": facts.summary_id, "type": summary_type, "attributes": attributes}


def audience_sort_key(attributes: Mapping[str, Any], key: str) -> Any:
    """A summary's value for an audiences sort (the enum without its '-').

    Guess: `name` sorts without regard to case; `recent` is the last use (`last_used_date`; a
    segment never used is the least recent); the counts sort by their `count`, a segment without
    one below every count. Equal values keep the account's order.
    """
    if key == "name":
        return attributes["name"].casefold()
    if key in ("updated_date", "recent"):
        # One ISO format throughout, so the text sorts as the time does.
        return attributes.get("updated_date" if key == "updated_date" else "last_used_date", "")
    count = attributes.get("counts", {}).get(key, {}).get("count")
    return -1 if count is None else count

"""What the discovery sensor decides from one full listing (pure: state in, decisions out).

`reconcile` compares the listing with the tracked partitions and the deleted set: segments to
add, tracked ones missing for the first time (kept in the cursor), missing for the second time
in a row (marked deleted), and marked ones listed again (unmarked). `catalog_due` is the refresh
rule of the catalog table:

- a change of what the catalog shows by segment (ids, names, definitions' update dates, status,
  tracked) refreshes it at the next tick;
- a change of sizes or runs alone (`counts.last_total`, `last_used_date`) refreshes it at most
  every `COUNTS_REFRESH_SECONDS`. Every match-all run updates its segment's count, so at 10,000
  segments the counts change on every tick while a kick-off's runs finish (about an hour): keyed
  to them, the catalog would be rewritten every minute. An hour keeps the sizes at most an hour
  (and a tick) old for two requests and one short run an hour at most.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from matchall_dagster.api.models import Segment

COUNTS_REFRESH_SECONDS = 3_600.0
CURSOR_VERSION = 1


@dataclass
class DiscoveryCursor:
    """What one tick tells the next: the tracked segments missing from the last listing, and the
    listing's fingerprints and time when the catalog was last requested."""

    missing: set[str] = field(default_factory=set)
    structure: str | None = None
    counts: str | None = None
    refreshed_at: float = 0.0

    def dump(self) -> str:
        packed = base64.b64encode(zlib.compress("\n".join(sorted(self.missing)).encode(), 6)).decode()
        data = {
            "v": CURSOR_VERSION,
            "missing": packed if self.missing else "",
            "structure": self.structure,
            "counts": self.counts,
            "refreshed_at": self.refreshed_at,
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def load(cls, raw: str | None, log: logging.Logger) -> DiscoveryCursor:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
                raise ValueError("another version")
            packed = data["missing"]
            missing = zlib.decompress(base64.b64decode(packed, validate=True)).decode().split("\n") if packed else []
            structure, counts = data["structure"], data["counts"]
            if not all(value is None or isinstance(value, str) for value in (structure, counts)):
                raise ValueError("bad fingerprint")
            return cls(set(missing), structure, counts, float(data["refreshed_at"]))
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            log.error(
                f"The discovery sensor's cursor could not be read ({exc}); starting afresh: segments missing from "
                f"the listing are marked deleted after two more listings, and the catalog is refreshed."
            )
            return cls()


@dataclass(frozen=True)
class Reconciliation:
    """What one listing changes (lists sorted: the listing's own order changes with its sort)."""

    new: list[str]  # listed, admitted, not a partition yet: add and kick off
    missing_once: set[str]  # tracked partitions missing from this listing only: remembered
    to_mark: list[str]  # tracked partitions missing from this listing and the one before: marked deleted
    listed_again: list[str]  # marked deleted, listed now: unmarked


def reconcile(
    listed: Iterable[str],
    admitted: Collection[str],
    partitions: Collection[str],
    deleted: Collection[str],
    missing_before: Collection[str],
) -> Reconciliation:
    """`listed`: every id of the full listing; `admitted`: those of them and of `partitions` that
    MATCHALL_SEGMENTS admits (a partition it does not admit is never marked)."""
    listed = list(listed)
    present = set(listed)
    known = set(partitions)
    new = sorted({s for s in listed if s in admitted and s not in known})
    missing = {s for s in known if s in admitted and s not in present and s not in deleted}
    to_mark = sorted(missing & set(missing_before))
    return Reconciliation(
        new=new,
        missing_once=missing - set(to_mark),
        to_mark=to_mark,
        listed_again=sorted(present & set(deleted)),
    )


def _digest(lines: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for line in lines:
        hasher.update(line.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()[:32]


def fingerprints(listed: Iterable[Segment], partitions: Collection[str], deleted: Collection[str]) -> tuple[str, str]:
    """(structure, counts) of what the catalog would show, after this tick's changes."""
    segments = sorted(listed, key=lambda segment: segment.id)

    def when(value: object) -> str:
        return "" if value is None else str(value)

    structure = _digest(
        [
            *(f"s\t{s.id}\t{s.name}\t{when(s.created_date)}\t{when(s.updated_date)}" for s in segments),
            *(f"p\t{segment_id}" for segment_id in sorted(partitions)),
            *(f"d\t{segment_id}" for segment_id in sorted(deleted)),
        ]
    )
    counts = _digest(
        f"{s.id}\t{s.last_total}\t{s.last_run.run_id if s.last_run else ''}\t{when(s.last_used_date)}" for s in segments
    )
    return structure, counts


def catalog_due(cursor: DiscoveryCursor, structure: str, counts: str, now: float) -> str | None:
    """Why the catalog should be refreshed now, or None (see the module's rule)."""
    if cursor.structure is None:
        return "no catalog requested yet"
    if structure != cursor.structure:
        return "the listing changed"
    if counts != cursor.counts and now - cursor.refreshed_at >= COUNTS_REFRESH_SECONDS:
        return "sizes changed"
    return None

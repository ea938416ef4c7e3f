"""The records stored on a `segment_matches` partition, and their one key namespace.

Modelled on Dagster's `NamespacedMetadataSet` (not public in Dagster 1.13): a pydantic model whose
fields are stored as `matchall/<field>` metadata keys; `to_metadata()` writes them and
`extract(metadata)` reads them back. The kick-off and the readiness sensor write pending-run
records, the sensor and the kick-off's resume read them; discovery and the kick-off write deletion
records. Each key is spelled here only.

Records written before the namespace used bare keys (`run_id`, `sort`, `attempt`,
`run_started_at`, `segment_name`, `reason`, ...; `status` and `kickoff` were already namespaced).
A deployed instance holds pending runs recorded that way, so `extract` reads both spellings (the
namespaced one wins) and `to_metadata` writes the namespaced one only.

Pure apart from Dagster's `MetadataValue` (timestamps are stored as such, so the UI shows dates).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal, Self

import dagster as dg
from pydantic import BaseModel, ConfigDict

from matchall_dagster.api.models import MatchAllRun

NAMESPACE = "matchall"
PENDING: Final = "pending"
DELETED: Final = "deleted"
LISTED_AGAIN: Final = "listed_again"


def key(field: str) -> str:
    """The metadata key of a record field: `matchall/<field>`."""
    return f"{NAMESPACE}/{field}"


STATUS = key("status")  # every record has one: what the record says happened


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


def status_of(metadata: Mapping[str, Any]) -> str | None:
    """The record's status (the key never changed), without validating the rest."""
    value = _plain(metadata.get(STATUS))
    return value if isinstance(value, str) else None


class NamespacedRecord(BaseModel):
    """A set of metadata fields stored under `matchall/`; subclasses declare the fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fields stored as timestamps (epoch seconds in the model, dates in the UI).
    timestamps: ClassVar[frozenset[str]] = frozenset()
    # Fields that records written before the namespace stored under their bare name.
    legacy: ClassVar[frozenset[str]] = frozenset()

    def to_metadata(self) -> dict[str, Any]:
        return {
            key(name): dg.MetadataValue.timestamp(value) if name in self.timestamps else value
            for name, value in self.model_dump(exclude_none=True).items()
        }

    @classmethod
    def extract(cls, metadata: Mapping[str, Any]) -> Self:
        """The record in `metadata` (namespaced keys first, then legacy ones); raises pydantic's
        `ValidationError` when a field is missing or of the wrong type. Other keys are ignored."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if key(name) in metadata:
                values[name] = _plain(metadata[key(name)])
            elif name in cls.legacy and name in metadata:
                values[name] = _plain(metadata[name])
        return cls.model_validate(values)


class PendingRecord(NamespacedRecord):
    """A match-all run started and not read yet: what the readiness sensor needs to poll it."""

    timestamps: ClassVar[frozenset[str]] = frozenset({"run_started_at", "run_ended_at", "segment_timestamp"})
    legacy: ClassVar[frozenset[str]] = frozenset(
        {"run_id", "sort", "attempt", "run_started_at", "run_ended_at", "segment_timestamp", "segment_name"}
    )

    status: Literal["pending"] = PENDING
    run_id: str
    sort: str
    run_started_at: float | None = None  # the API's run_id_start
    run_ended_at: float | None = None
    segment_timestamp: float | None = None
    attempt: int = 1  # runs started for this segment by this kick-off, this one included
    kickoff: str | None = None  # the root Dagster run id of the kick-off that started the run
    segment_name: str | None = None
    # True: read alone, in a run of its own. Set when a batch of small segments could not read it
    # (see orchestration.small_reads), so that a second failure shows on its partition as a failed run.
    alone: bool | None = None

    @classmethod
    def of(
        cls, run: MatchAllRun, sort: str, *, attempt: int = 1, kickoff: str | None = None, name: str | None = None
    ) -> PendingRecord:
        return cls(
            run_id=run.run_id,
            sort=sort,
            run_started_at=run.run_id_start.timestamp(),
            run_ended_at=run.run_id_end.timestamp() if run.run_id_end is not None else None,
            segment_timestamp=run.segment_timestamp.timestamp() if run.segment_timestamp is not None else None,
            attempt=attempt,
            kickoff=kickoff,
            segment_name=name or None,
        )


class DeletionRecord(NamespacedRecord):
    """A tracked segment marked deleted in ActiveCampaign, or listed again after that."""

    legacy: ClassVar[frozenset[str]] = frozenset({"reason", "segment_name"})

    status: Literal["deleted", "listed_again"]
    reason: str | None = None
    segment_name: str | None = None


__all__ = [
    "DELETED",
    "LISTED_AGAIN",
    "NAMESPACE",
    "PENDING",
    "STATUS",
    "DeletionRecord",
    "NamespacedRecord",
    "PendingRecord",
    "key",
    "status_of",
]

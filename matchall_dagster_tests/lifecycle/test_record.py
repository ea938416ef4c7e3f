"""The records stored on a partition: one namespace written, old and new keys read."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest
from pydantic import ValidationError

from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.lifecycle.record import DeletionRecord, PendingRecord, status_of

STARTED = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
RUN = MatchAllRun(run_id="r-1", run_id_start=STARTED, run_id_end=None, is_ready=False, segment_id="7")

# A pending-run record as the kick-off wrote it before the namespace (kick-off and status were
# namespaced already), with the metadata values Dagster hands back.
OLD_PENDING = {
    "matchall/status": dg.MetadataValue.text("pending"),
    "attempt": dg.MetadataValue.int(2),
    "run_id": dg.MetadataValue.text("r-1"),
    "sort": dg.MetadataValue.text("-cdate"),
    "run_started_at": dg.MetadataValue.timestamp(STARTED),
    "matchall/kickoff": dg.MetadataValue.text("k-1"),
    "segment_name": dg.MetadataValue.text("VIP"),
}


def test_a_pending_record_is_written_under_one_namespace() -> None:
    metadata = PendingRecord.of(RUN, "-cdate", attempt=2, kickoff="k-1", name="VIP").to_metadata()
    assert set(metadata) == {
        "matchall/status",
        "matchall/run_id",
        "matchall/sort",
        "matchall/run_started_at",
        "matchall/attempt",
        "matchall/kickoff",
        "matchall/segment_name",
    }
    assert metadata["matchall/status"] == "pending"
    assert metadata["matchall/run_started_at"] == dg.MetadataValue.timestamp(STARTED)  # a date in the UI


def test_a_pending_record_round_trips_through_dagster_metadata() -> None:
    record = PendingRecord.of(RUN, "-cdate", attempt=2, kickoff="k-1", name="VIP")
    stored = dg.AssetObservation(asset_key="segment_matches", partition="7", metadata=record.to_metadata())
    assert PendingRecord.extract(stored.metadata) == record
    assert status_of(stored.metadata) == "pending"


def test_a_pending_record_with_the_old_keys_is_still_read() -> None:
    record = PendingRecord.extract(OLD_PENDING)
    assert record == PendingRecord(
        run_id="r-1", sort="-cdate", run_started_at=STARTED.timestamp(), attempt=2, kickoff="k-1", segment_name="VIP"
    )
    assert status_of(OLD_PENDING) == "pending"
    # Written again, it takes the new keys only.
    assert not {"run_id", "sort", "attempt", "segment_name", "run_started_at"} & set(record.to_metadata())


def test_the_namespaced_key_wins_over_the_old_one() -> None:
    both = {**OLD_PENDING, "matchall/run_id": "r-2"}
    assert PendingRecord.extract(both).run_id == "r-2"


def test_a_record_missing_its_run_id_or_of_another_kind_is_refused() -> None:
    with pytest.raises(ValidationError):
        PendingRecord.extract({"matchall/status": "pending", "matchall/sort": "id"})
    with pytest.raises(ValidationError):
        PendingRecord.extract({**OLD_PENDING, "matchall/status": "deleted"})
    assert status_of({"run_id": "r"}) is None


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            {"matchall/status": "deleted", "reason": "gone", "segment_name": "VIP"},  # as written before
            DeletionRecord(status="deleted", reason="gone", segment_name="VIP"),
        ),
        ({"matchall/status": "listed_again"}, DeletionRecord(status="listed_again")),
    ],
)
def test_deletion_records_old_and_new(metadata: dict[str, str], expected: DeletionRecord) -> None:
    assert DeletionRecord.extract(metadata) == expected
    assert DeletionRecord.extract(expected.to_metadata()) == expected
    assert all(key.startswith("matchall/") for key in expected.to_metadata())

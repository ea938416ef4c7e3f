"""read_small_segments: small ready segments read in one run, each partition recorded as its own runs would."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pytest

from matchall_dagster.lifecycle.policy import PendingRun
from matchall_dagster.lifecycle.record import PendingRecord
from matchall_dagster.orchestration import small_reads
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.checks import evaluation, materialized_verdicts
from matchall_dagster.orchestration.names import BATCH_TAG, PLAUSIBLE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.orchestration.small_reads import batch_requests
from matchall_dagster.simulator import SimulatorServer
from matchall_dagster.storage.store import StoreUrl
from matchall_dagster_tests.conftest import CHECKS, materialize_segment, set_setting
from matchall_dagster_tests.orchestration.sensor_ticks import READINESS, reads_of, record_pending, tick
from matchall_dagster_tests.orchestration.stores import count, failing_before_commit, stored

pytestmark = pytest.mark.usefixtures("sensor_clock")

MATCHES_KEY = DEFAULT_ACCOUNT.matches_key
CHANGES_KEY = DEFAULT_ACCOUNT.changes_key
SMALL = ("1", "9999", "10000", "100")  # one page or less, the empty segment included


def run_requests(
    defs: dg.Definitions, instance: dg.DagsterInstance, requests: list[dg.RunRequest]
) -> list[dg.ExecuteInProcessResult]:
    """Each requested run executed as the daemon would launch it."""
    return [
        defs.resolve_job_def(request.job_name or "").execute_in_process(
            run_config=request.run_config,
            instance=instance,
            partition_key=request.partition_key,
            tags=request.tags,
            resources=defs.resources,
            raise_on_error=False,
        )
        for request in requests
    ]


def latest(instance: dg.DagsterInstance, key: dg.AssetKey, segment_id: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[segment_id]), limit=1
    ).records
    return records[0] if records else None


def verdicts(instance: dg.DagsterInstance, key: dg.AssetKey, segment_id: str) -> dict[str, bool]:
    """Each check's verdict on the partition as the UI lists it: its latest evaluation, counted only
    while it names the partition's latest materialization as its target (`is_current`)."""
    found: dict[str, bool] = {}
    names = [name for name in (*CHECKS, PLAUSIBLE) if (name == PLAUSIBLE) == (key == CHANGES_KEY)]
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [dg.AssetCheckKey(key, name) for name in names], partition_keys=[segment_id]
    )
    for info in infos:
        assert info.is_current, f"{info.check_key.name} on {segment_id} does not judge the latest materialization"
        found[info.check_key.name] = info.latest_execution_status.value == "SUCCEEDED"
    return found


def test_small_ready_segments_share_one_run_and_each_partition_gets_its_own_events(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: the batch's rows, history and events are those its segments' own runs would record."""
    defs = store_defs
    runs = record_pending(instance, server, *SMALL, "10001")
    data = tick(instance, defs, READINESS)
    batches = [request for request in data.run_requests if request.job_name == "read_small_segments"]
    (batch,) = batches
    assert batch.tags[BATCH_TAG] == str(len(SMALL))
    assert sorted(read.segment_id for read in reads_of(data) if read.batch) == sorted(SMALL)
    alone = [request for request in data.run_requests if request.job_name == "segment_matches_job"]
    assert [request.partition_key for request in alone] == ["10001"]

    (result,) = run_requests(defs, instance, [batch])
    assert result.success
    single = materialize_segment(defs, instance, "25001")  # a partition materialized alone, for comparison
    (alone_event,) = single.asset_materializations_for_node("segment_matches")
    for segment_id in SMALL:
        record = latest(instance, MATCHES_KEY, segment_id)
        assert record is not None
        assert record.run_id == result.run_id
        assert record.asset_materialization is not None
        metadata = {key: value.value for key, value in record.asset_materialization.metadata.items()}
        assert metadata["run_id"] == runs[segment_id]
        assert metadata["page_total"] == metadata["dagster/row_count"] == len(server.simulator.truth(segment_id))
        # The same metadata as a materialization of its own, the store's included.
        assert set(alone_event.metadata) == set(metadata)
        url = StoreUrl.parse(store_url)
        assert (metadata["dagster/storage_kind"], metadata["dagster/table_name"]) == (
            url.kind,
            url.table_name("segment_matches"),
        )
        assert stored(store_url, segment_id) == server.simulator.truth(segment_id)
        changes = latest(instance, CHANGES_KEY, segment_id)
        assert changes is not None
        assert changes.run_id == result.run_id
        assert changes.asset_materialization is not None
        assert changes.asset_materialization.metadata["joined"].value == len(server.simulator.truth(segment_id))
        joined = count(store_url, "segment_membership_changes", "segment_id = ? and change = 'joined'", [segment_id])
        assert joined == len(server.simulator.truth(segment_id))
        assert verdicts(instance, MATCHES_KEY, segment_id) == dict.fromkeys(CHECKS, True)
        assert verdicts(instance, CHANGES_KEY, segment_id) == {PLAUSIBLE: True}


def test_the_changes_automation_stands_aside_for_batched_partitions_only(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer
) -> None:
    record_pending(instance, server, "1", "9999")
    selection = dg.AssetSelection.assets(CHANGES_KEY)
    idle = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
    assert run_requests(defs, instance, tick(instance, defs, READINESS).run_requests)[0].success
    after_batch = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=selection, cursor=idle.cursor
    )
    assert after_batch.get_requested_partitions(CHANGES_KEY) == set()  # the batch recorded them
    materialize_segment(defs, instance, "1")  # an analyst's materialization, by hand
    by_hand = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=selection, cursor=after_batch.cursor
    )
    assert by_hand.get_requested_partitions(CHANGES_KEY) == {"1"}


def test_a_failed_or_expired_run_in_a_batch_shows_on_its_own_partition(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer
) -> None:
    runs = record_pending(instance, server, "1", "77", "88")
    server.simulator.advance_clock(61)  # 77's run has failed, 88's has expired
    reads = [
        small_reads.SmallRead(segment_id=segment_id, run_id=run_id, sort="id").model_dump()
        for segment_id, run_id in runs.items()
    ]
    result = defs.resolve_job_def("read_small_segments").execute_in_process(
        run_config={"ops": {"read_segment_batch": {"config": {"reads": reads}}}},
        instance=instance,
        resources=defs.resources,
    )
    assert result.success  # the others are read; the failures are on their partitions
    assert latest(instance, MATCHES_KEY, "1") is not None
    assert latest(instance, MATCHES_KEY, "77") is None
    assert latest(instance, MATCHES_KEY, "88") is None
    assert verdicts(instance, MATCHES_KEY, "77") == {RUN_NOT_FAILED: False}
    assert verdicts(instance, MATCHES_KEY, "88") == {RUN_NOT_EXPIRED: False}


def test_a_segment_the_batch_cannot_store_is_read_again_alone(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: a write that fails in its transaction (on the batch's one connection) hands its segment
    back, and the segments around it are stored on the same connection."""
    defs = store_defs
    runs = record_pending(instance, server, "1", "9999", "10000")
    first = tick(instance, defs, READINESS)
    with failing_before_commit(store_url, "replace_partition", only={"9999"}) as written:
        (result,) = run_requests(defs, instance, first.run_requests)
    assert written == [9_999]
    assert result.success
    for segment_id in ("1", "10000"):
        assert stored(store_url, segment_id) == server.simulator.truth(segment_id)
        assert latest(instance, CHANGES_KEY, segment_id) is not None
    assert latest(instance, MATCHES_KEY, "9999") is None
    assert stored(store_url, "9999") == []
    (observation,) = [
        event.asset_observation_data.asset_observation
        for event in result.all_events
        if event.event_type_value == "ASSET_OBSERVATION"
    ]
    assert observation.partition == "9999"
    assert PendingRecord.extract(observation.metadata).alone

    # The sensor polls it again and reads it in a run of its own, where a failure is the run's.
    again = tick(instance, defs, READINESS, first.cursor)
    assert [(read.segment_id, read.run_id, read.batch) for read in reads_of(again)] == [("9999", runs["9999"], False)]
    (alone,) = run_requests(defs, instance, again.run_requests)
    assert alone.success
    assert stored(store_url, "9999") == server.simulator.truth("9999")


def test_batches_hold_at_most_the_configured_number_of_segments(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = [PendingRun(segment_id=str(i), run_id=f"r{i}", sort="id", started_at=0.0) for i in range(5)]
    requests = batch_requests(DEFAULT_ACCOUNT, pending, 2)
    assert [request.tags[BATCH_TAG] for request in requests] == ["2", "2", "1"]
    assert len({request.run_key for request in requests}) == 3
    assert [request.run_key for request in batch_requests(DEFAULT_ACCOUNT, pending, 2)] == [
        request.run_key for request in requests
    ]

    set_setting(monkeypatch, "MATCHALL_SMALL_BATCH_SEGMENTS", "0")  # every segment in a run of its own
    record_pending(instance, server, "1", "9999")
    data = tick(instance, defs, READINESS)
    assert {request.job_name for request in data.run_requests} == {"segment_matches_job"}
    assert sorted(read.segment_id for read in reads_of(data)) == ["1", "9999"]


@pytest.mark.parametrize(
    ("verdicts_logged", "later"),
    # A first read left without its changes is taken up one tick later once its blocking checks
    # passed; one whose verdicts were never logged is not diffed (its blocking checks did not pass).
    [(True, {"9999"}), (False, set())],
    ids=["stopped-after-the-verdicts", "stopped-before-the-verdicts"],
)
def test_a_tick_between_a_batch_s_two_materializations_requests_nothing(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    verdicts_logged: bool,
    later: set[str],
) -> None:
    """The automation's tick lands after a batch's materialization of segment_matches and before its
    materialization of segment_membership_changes (here: the batch stops in between)."""
    selection = dg.AssetSelection.assets(CHANGES_KEY)
    record_pending(instance, server, "1")
    assert run_requests(defs, instance, tick(instance, defs, READINESS).run_requests)[0].success  # read before
    evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)

    def matches_only(self: Any, item: Any) -> None:
        self._log(dg.AssetMaterialization(MATCHES_KEY, partition=item.segment_id, metadata=item.metadata))
        if verdicts_logged:  # as `_Batch._record` logs them, before the history step
            ((_, record),) = self._latest(MATCHES_KEY, [item])
            stored = {key: value.value for key, value in record.asset_materialization.metadata.items()}
            for result in materialized_verdicts(stored, item.summary, datetime.now(UTC)):
                self._log(evaluation(result, MATCHES_KEY, item.segment_id, record))

    monkeypatch.setattr(f"{small_reads.__name__}._Batch._record", matches_only)
    record_pending(instance, server, "1", "9999")  # 1 again, 9999 for the first time
    (stopped,) = run_requests(defs, instance, tick(instance, defs, READINESS).run_requests)
    assert not stopped.success  # it stopped before the history
    for segment_id in ("1", "9999"):
        matches = latest(instance, MATCHES_KEY, segment_id)
        assert matches is not None
        assert matches.run_id == stopped.run_id
    for expected in (set(), later):  # a first read left without its changes is taken up one tick later
        evaluated = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, asset_selection=selection, cursor=evaluated.cursor
        )
        assert evaluated.get_requested_partitions(CHANGES_KEY) == expected

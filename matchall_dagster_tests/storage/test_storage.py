"""The DuckDB IO manager: a partition's rows are replaced atomically, empty partitions create the
table, and partition keys reach SQL only as escaped literals of validated ids.

Most tests write through a stand-in asset (same key, partitions and partition column as
`segment_matches`, rows from its run config), so that the IO manager alone is under test; the
others materialize the real asset against the simulator.
"""

import multiprocessing
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.assets import members_frame
from matchall_dagster.simulator import SimulatorServer
from matchall_dagster.storage import io_manager as storage
from matchall_dagster.storage.io_manager import MatchallDuckDBIOManager, PartitionSummary
from matchall_dagster_tests.conftest import materialize_segment

ASSET_KEY = dg.AssetKey("segment_matches")
COLUMNS = [("segment_id", "VARCHAR"), ("position", "BIGINT"), ("contact_id", "BIGINT")]
HOSTILE = "x' or '1'='1"


# (No `from __future__ import annotations` in this module: Dagster reads the config class from the
# asset function's annotations, and a string annotation would not resolve.)
class StandInRows(dg.Config):
    contact_ids: list[int]


@dg.asset(
    name="segment_matches",
    partitions_def=DEFAULT_ACCOUNT.segments_partitions,
    metadata={"partition_expr": "segment_id"},
)
def stand_in(context: dg.AssetExecutionContext, config: StandInRows) -> pd.DataFrame:
    return members_frame(context.partition_key, np.asarray(config.contact_ids, dtype=np.int64))


def write(
    instance: dg.DagsterInstance,
    duckdb_file: Path,
    segment_id: str,
    contact_ids: list[int],
    *,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    if segment_id not in instance.get_dynamic_partitions("segments"):
        instance.add_dynamic_partitions("segments", [segment_id])
    return dg.materialize(
        [stand_in],
        partition_key=segment_id,
        run_config={"ops": {"segment_matches": {"config": {"contact_ids": contact_ids}}}},
        instance=instance,
        resources={"io_manager": MatchallDuckDBIOManager(database=str(duckdb_file), schema="main")},
        raise_on_error=raise_on_error,
    )


def query(duckdb_file: Path, sql: str, parameters: list[Any] | None = None) -> list[tuple[Any, ...]]:
    connection = duckdb.connect(str(duckdb_file))
    try:
        return connection.execute(sql, parameters or []).fetchall()
    finally:
        connection.close()


def stored(duckdb_file: Path, segment_id: str) -> list[int]:
    rows = query(
        duckdb_file,
        "select position, contact_id from segment_matches where segment_id = ? order by position",
        [segment_id],
    )
    assert [position for position, _ in rows] == list(range(1, len(rows) + 1))
    return [contact_id for _, contact_id in rows]


def partitions(duckdb_file: Path) -> dict[str, int]:
    return dict(query(duckdb_file, "select segment_id, count(*) from segment_matches group by segment_id"))


def column_types(duckdb_file: Path) -> list[tuple[str, str]]:
    return [(name, kind) for name, kind, *_ in query(duckdb_file, "describe segment_matches")]


def materialize_real(
    defs: dg.Definitions, instance: dg.DagsterInstance, segment_id: str, **config: Any
) -> dg.ExecuteInProcessResult:
    return materialize_segment(defs, instance, segment_id, config, raise_on_error=False)


# -- the frame --------------------------------------------------------------------------------


@pytest.mark.parametrize("contact_ids", [[], [7], [30, 10, 20], list(range(1, 1_001))])
def test_members_frame_is_typed_and_duckdb_stores_it_as_varchar_and_bigints(contact_ids: list[int]) -> None:
    ids = np.asarray(contact_ids, dtype=np.int64)
    frame = members_frame("1ab85f0e-3b5c", ids)

    assert list(frame.columns) == ["segment_id", "position", "contact_id"]
    assert frame["position"].dtype == np.int64
    assert frame["contact_id"].dtype == np.int64
    assert frame["position"].tolist() == list(range(1, len(ids) + 1))
    assert frame["contact_id"].tolist() == contact_ids
    segment_type = frame["segment_id"].dtype
    assert isinstance(segment_type, pd.ArrowDtype)
    arrow_type = segment_type.pyarrow_dtype
    assert isinstance(arrow_type, pa.DictionaryType)  # the id is stored once, not once per row
    assert arrow_type.value_type == pa.string()
    assert frame["segment_id"].tolist() == ["1ab85f0e-3b5c"] * len(ids)

    connection = duckdb.connect()
    try:
        connection.register("frame", frame)
        connection.execute("create table t as select * from frame")
        types = [(name, kind) for name, kind, *_ in connection.execute("describe t").fetchall()]
        rows = connection.execute("select * from t order by position").fetchall()
    finally:
        connection.close()
    assert types == COLUMNS
    assert rows == [("1ab85f0e-3b5c", position, cid) for position, cid in enumerate(contact_ids, 1)]


# -- replacing a partition --------------------------------------------------------------------


def test_a_partition_is_replaced_not_appended_and_others_are_untouched(
    instance: dg.DagsterInstance, duckdb_file: Path
) -> None:
    write(instance, duckdb_file, "1", [11, 12, 13, 14, 15])
    write(instance, duckdb_file, "2", [21, 22])
    write(instance, duckdb_file, "1", [15, 14])  # fewer rows, another order
    assert stored(duckdb_file, "1") == [15, 14]
    assert stored(duckdb_file, "2") == [21, 22]
    write(instance, duckdb_file, "1", [])  # the segment emptied: its rows go, the others stay
    assert partitions(duckdb_file) == {"2": 2}
    write(instance, duckdb_file, "1", [16])
    assert partitions(duckdb_file) == {"1": 1, "2": 2}
    assert column_types(duckdb_file) == COLUMNS


def test_rematerializing_a_segment_in_another_sort_replaces_its_rows(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    assert materialize_real(defs, instance, "10001").success
    assert materialize_real(defs, instance, "1").success
    result = materialize_real(defs, instance, "10001", sort="-email")
    assert result.success
    assert stored(duckdb_file, "10001") == server.simulator.truth("10001", "-email")
    assert stored(duckdb_file, "1") == server.simulator.truth("1")
    assert partitions(duckdb_file) == {"10001": 10_001, "1": 1}
    (event,) = result.asset_materializations_for_node("segment_matches")
    assert event.metadata["dagster/partition_row_count"].value == 10_001


@pytest.mark.parametrize("real", [True, False], ids=["segment_matches", "stand-in"])
def test_an_empty_first_materialization_creates_the_table_with_its_types(
    defs: dg.Definitions, instance: dg.DagsterInstance, duckdb_file: Path, real: bool
) -> None:
    # "100" is the simulator's empty segment.
    result = materialize_real(defs, instance, "100") if real else write(instance, duckdb_file, "100", [])
    assert result.success
    assert column_types(duckdb_file) == COLUMNS
    assert query(duckdb_file, "select count(*) from segment_matches") == [(0,)]
    (event,) = result.asset_materializations_for_node("segment_matches")
    assert event.metadata["dagster/partition_row_count"].value == 0
    write(instance, duckdb_file, "2", [5, 3])  # the table made from no rows takes rows
    assert stored(duckdb_file, "2") == [5, 3]
    assert column_types(duckdb_file) == COLUMNS


# -- atomicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("replacement", [[4, 5, 6, 7], []], ids=["rows", "empty"])
def test_a_failure_inside_the_write_leaves_the_previous_rows_exactly(
    instance: dg.DagsterInstance, duckdb_file: Path, monkeypatch: pytest.MonkeyPatch, replacement: list[int]
) -> None:
    write(instance, duckdb_file, "1", [3, 1, 2])
    write(instance, duckdb_file, "2", [9])
    seen_by_others: list[list[tuple[Any, ...]]] = []
    handle_output = storage._PandasTypeHandler.handle_output

    def insert_then_fail(
        self: storage._PandasTypeHandler,
        context: dg.OutputContext,
        table_slice: Any,
        obj: pd.DataFrame,
        connection: Any,
    ) -> Any:
        # The partition's old rows are deleted and the new ones inserted, in this transaction ...
        handle_output(self, context, table_slice, obj, connection)
        mine = connection.execute("select contact_id from main.segment_matches where segment_id = '1'").fetchall()
        assert sorted(mine) == sorted((cid,) for cid in replacement)
        # ... which another connection does not see: it reads the old rows, never an empty partition.
        other = connection.cursor()
        try:
            seen_by_others.append(
                other.execute(
                    "select contact_id from main.segment_matches where segment_id = '1' order by position"
                ).fetchall()
            )
        finally:
            other.close()
        raise OSError("No space left on device")  # ... and then the write fails

    monkeypatch.setattr(storage._PandasTypeHandler, "handle_output", insert_then_fail)
    result = write(instance, duckdb_file, "1", replacement, raise_on_error=False)

    assert not result.success
    assert seen_by_others == [[(3,), (1,), (2,)]]
    assert stored(duckdb_file, "1") == [3, 1, 2]  # rolled back: exactly as before
    assert stored(duckdb_file, "2") == [9]
    assert partitions(duckdb_file) == {"1": 3, "2": 1}


# -- partition keys in SQL --------------------------------------------------------------------


def test_the_partition_filter_quotes_the_key_as_a_literal(instance: dg.DagsterInstance, duckdb_file: Path) -> None:
    """The IO manager never pastes a key into SQL unescaped (keys reaching it are validated ids,
    see below; this is the second line of defence)."""
    write(instance, duckdb_file, "1", [1, 2])
    write(instance, duckdb_file, HOSTILE, [7, 8, 9])
    result = write(instance, duckdb_file, HOSTILE, [6])
    (event,) = result.asset_materializations_for_node("segment_matches")
    assert (
        event.metadata["Query"].value == "SELECT * FROM main.segment_matches WHERE\nsegment_id in ('x'' or ''1''=''1')"
    )
    assert partitions(duckdb_file) == {"1": 2, HOSTILE: 1}
    assert stored(duckdb_file, HOSTILE) == [6]


@pytest.mark.parametrize("segment_id", [HOSTILE, "1'); drop table segment_matches; --", "a/../b", "1 "])
def test_segment_matches_refuses_a_partition_key_that_is_not_an_id(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path, segment_id: str
) -> None:
    assert materialize_real(defs, instance, "1").success
    requests = server.simulator.stats()["requests"]
    result = materialize_real(defs, instance, segment_id)
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert failure.step_failure_data.user_failure_data is not None
    assert "is not a valid ActiveCampaign id" in str(failure.step_failure_data.user_failure_data.description)
    assert server.simulator.stats()["requests"] == requests  # refused before any request
    assert partitions(duckdb_file) == {"1": 1}


def _materialize_in_another_process(instance_ref: Any, database: str, segment_id: str, times: int) -> bool:
    from matchall_dagster.definitions import build_definitions

    defs = build_definitions(duckdb_database=database)
    instance = dg.DagsterInstance.from_ref(instance_ref)
    return all(
        dg.materialize(
            [defs.get_assets_def("segment_matches"), *(defs.asset_checks or [])],
            partition_key=segment_id,
            instance=instance,
            resources=defs.resources,
            raise_on_error=False,
        ).success
        for _ in range(times)
    )


def test_concurrent_runs_of_different_partitions_share_the_file(
    instance: dg.DagsterInstance, defs: dg.Definitions, server: SimulatorServer, duckdb_file: Path
) -> None:
    """Two processes (as two Dagster runs) write the same DuckDB file at once: DuckDB admits one
    writer at a time, and the IO manager's connection retries wait for the other."""
    segments = ["25001", "10001"]
    instance.add_dynamic_partitions("segments", segments)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        outcomes = pool.starmap(
            _materialize_in_another_process,
            [(instance.get_ref(), str(duckdb_file), segment_id, 3) for segment_id in segments],
        )
    assert outcomes == [True, True]
    for segment_id in segments:
        assert stored(duckdb_file, segment_id) == server.simulator.truth(segment_id)


# -- partition summaries (what matches_complete judges) ------------------------------------------

summaries: list[PartitionSummary] = []


@dg.asset(partitions_def=DEFAULT_ACCOUNT.segments_partitions)
def summary_reader(segment_matches: PartitionSummary) -> None:
    summaries.append(segment_matches)


def summarize(instance: dg.DagsterInstance, duckdb_file: Path, segment_id: str) -> PartitionSummary:
    """The partition as the IO manager summarizes it for an input annotated `PartitionSummary`."""
    summaries.clear()
    if segment_id not in instance.get_dynamic_partitions("segments"):
        instance.add_dynamic_partitions("segments", [segment_id])
    source = dg.AssetSpec(
        ASSET_KEY, partitions_def=DEFAULT_ACCOUNT.segments_partitions, metadata={"partition_expr": "segment_id"}
    )
    dg.materialize(
        [source, summary_reader],
        selection=[summary_reader],
        partition_key=segment_id,
        instance=instance,
        resources={"io_manager": MatchallDuckDBIOManager(database=str(duckdb_file), schema="main")},
    )
    (summary,) = summaries
    return summary


def tamper(duckdb_file: Path, sql: str) -> None:
    connection = duckdb.connect(str(duckdb_file))
    try:
        connection.execute(sql)
    finally:
        connection.close()


# Dense ids take the bitmap over their range; ids spread over 2**62 take the grouping.
@pytest.mark.parametrize("spread", [3, 2**52], ids=["dense", "sparse"])
def test_a_partition_summary_counts_rows_positions_and_repeats_exactly(
    instance: dg.DagsterInstance, duckdb_file: Path, spread: int
) -> None:
    ids = [spread * n + 11 for n in (5, 1, 4, 2, 3, 9, 8)]
    write(instance, duckdb_file, "1", ids)
    write(instance, duckdb_file, "2", [ids[0], ids[0], ids[0]])  # another partition: never counted
    assert summarize(instance, duckdb_file, "1") == PartitionSummary(7, 1, 7, 0, 0)
    assert summarize(instance, duckdb_file, "1").positions_exact

    # An id stored three times (two repeats), and a position twice, a gap where the other was.
    tamper(
        duckdb_file, f"update segment_matches set contact_id = {ids[2]} where segment_id = '1' and position in (1, 6)"
    )
    tamper(duckdb_file, "update segment_matches set position = 3 where segment_id = '1' and position = 4")
    summary = summarize(instance, duckdb_file, "1")
    assert summary == PartitionSummary(7, 1, 7, repeated_contacts=2, repeated_positions=1)
    assert not summary.positions_exact

    tamper(duckdb_file, "update segment_matches set position = position + 10 where segment_id = '1'")
    assert not summarize(instance, duckdb_file, "1").positions_exact  # 11..17, not 1..7


def test_a_partition_summary_of_no_rows_or_no_table(instance: dg.DagsterInstance, duckdb_file: Path) -> None:
    assert summarize(instance, duckdb_file, "1") == PartitionSummary(0, None, None, 0, 0)  # no table yet
    write(instance, duckdb_file, "1", [])
    empty = summarize(instance, duckdb_file, "1")
    assert empty == PartitionSummary(0, None, None, 0, 0)
    assert empty.positions_exact


def memory_limit_of(database: str, config: dict[str, Any] | None = None) -> str:
    connection = duckdb.connect(database, config=config or {})
    try:
        return str(connection.execute("select current_setting('memory_limit')").fetchall()[0][0])
    finally:
        connection.close()


@pytest.mark.parametrize("configured", [None, "1GB"], ids=["default", "configured"])
def test_duckdb_memory_is_capped_unless_configured(duckdb_file: Path, configured: str | None) -> None:
    """DuckDB would take up to 80% of the machine's memory; the IO manager's connections cap it."""
    connection_config = {} if configured is None else {"memory_limit": configured}
    context = dg.build_output_context(
        resource_config={"database": str(duckdb_file), "connection_config": connection_config}
    )
    with storage._TransactionalDuckDbClient.connect(context, None) as connection:  # type: ignore[arg-type]
        limit = str(connection.execute("select current_setting('memory_limit')").fetchall()[0][0])
    expected = memory_limit_of(":memory:", {"memory_limit": configured or storage.DEFAULT_MEMORY_LIMIT})
    assert limit == expected
    assert limit != memory_limit_of(":memory:")  # DuckDB's own default differs from both


# -- unpartitioned tables ---------------------------------------------------------------------


class StandInTable(dg.Config):
    names: list[str]
    with_size: bool = False


@dg.asset(name="unpartitioned")
def whole_table(config: StandInTable) -> pd.DataFrame:
    frame = pd.DataFrame({"name": pd.Series(config.names, dtype="string")})
    if config.with_size:
        frame["size"] = pd.Series(range(len(config.names)), dtype="Int64")
    return frame


def test_an_unpartitioned_frame_replaces_the_whole_table_columns_included(
    instance: dg.DagsterInstance, duckdb_file: Path
) -> None:
    def write_table(names: list[str], with_size: bool = False) -> None:
        assert dg.materialize(
            [whole_table],
            run_config={"ops": {"unpartitioned": {"config": {"names": names, "with_size": with_size}}}},
            instance=instance,
            resources={"io_manager": MatchallDuckDBIOManager(database=str(duckdb_file), schema="main")},
        ).success

    write_table([])  # empty: the table still exists, typed
    assert query(duckdb_file, "select count(*) from main.unpartitioned") == [(0,)]
    write_table(["a", "b"])
    write_table(["c"], with_size=True)  # a column more: replaced, not a failed insert
    assert query(duckdb_file, "select * from main.unpartitioned") == [("c", 0)]

"""Dagster's way into the store, on each engine: `MatchallIOManager` writes a partition of
`segment_matches` and the catalog's table, a check reads a partition's `PartitionSummary`
(computed by the database), and the real `segment_matches` lands its members in the store.

Most tests write through a stand-in asset (the key and partitions of `segment_matches`, rows from
its run config), so that the IO manager alone is under test; the others materialize the real
asset against the simulator.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from matchall_dagster.definitions import build_definitions
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.assets import members_frame
from matchall_dagster.simulator import SimulatorServer
from matchall_dagster.storage.io_manager import MatchallIOManager
from matchall_dagster.storage.store import MATCHES_TABLE, PartitionSummary, StoreUrl, open_store
from matchall_dagster_tests.conftest import materialize_segment
from matchall_dagster_tests.storage.engines import database

SEGMENTS = DEFAULT_ACCOUNT.segments_partitions
MATCHES_TYPES = {"segment_id": "varchar", "position": "bigint", "contact_id": "bigint"}


# (No `from __future__ import annotations` in this module: Dagster reads the config class and the
# input types from the functions' annotations, and a string annotation would not resolve.)
class StandInRows(dg.Config):
    contact_ids: list[int]


@dg.asset(name="segment_matches", partitions_def=SEGMENTS)
def stand_in(context: dg.AssetExecutionContext, config: StandInRows) -> pd.DataFrame:
    return members_frame(context.partition_key, np.asarray(config.contact_ids, dtype=np.int64))


summaries: list[PartitionSummary] = []
loaded: list[pd.DataFrame] = []


@dg.asset_check(asset=stand_in, partitions_def=SEGMENTS)
def complete(segment_matches: PartitionSummary) -> dg.AssetCheckResult:
    """What `matches_complete` gets: the summary, never the rows."""
    summaries.append(segment_matches)
    return dg.AssetCheckResult(
        passed=segment_matches.positions_exact and segment_matches.repeated_contacts == 0,
        metadata={"rows": segment_matches.rows},
    )


@dg.asset(partitions_def=SEGMENTS)
def rows_reader(segment_matches: pd.DataFrame) -> None:
    loaded.append(segment_matches)


def write(
    instance: dg.DagsterInstance, store_url: str, segment_id: str, contact_ids: list[int]
) -> dg.ExecuteInProcessResult:
    if segment_id not in instance.get_dynamic_partitions("segments"):
        instance.add_dynamic_partitions("segments", [segment_id])
    summaries.clear()
    loaded.clear()
    return dg.materialize(
        [stand_in, complete, rows_reader],
        partition_key=segment_id,
        run_config={"ops": {"segment_matches": {"config": {"contact_ids": contact_ids}}}},
        instance=instance,
        resources={"io_manager": MatchallIOManager(store=store_url)},
    )


def test_the_io_manager_replaces_a_partition_and_a_check_reads_its_summary(
    instance: dg.DagsterInstance, store_url: str
) -> None:
    result = write(instance, store_url, "1", [30, 10, 20])
    (check,) = result.get_asset_check_evaluations()
    assert (check.passed, check.partition) == (True, "1")
    assert summaries == [PartitionSummary(3, 1, 3, 0, 0)]
    assert [frame.values.tolist() for frame in loaded] == [[["1", 1, 30], ["1", 2, 10], ["1", 3, 20]]]
    (event,) = result.asset_materializations_for_node("segment_matches")
    url = StoreUrl.parse(store_url)
    assert {key: event.metadata[key].value for key in event.metadata} == {
        "dagster/partition_row_count": 3,
        "dagster/storage_kind": url.kind,
        "dagster/table_name": url.table_name(MATCHES_TABLE),
        "store": str(url),
    }

    write(instance, store_url, "2", [7])
    result = write(instance, store_url, "1", [5, 6, 5])  # replaced, and an id twice: the check sees it
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert summaries == [PartitionSummary(3, 1, 3, repeated_contacts=1, repeated_positions=0)]
    assert open_store(store_url).read_partition("1")["contact_id"].tolist() == [5, 6, 5]
    write(instance, store_url, "1", [])  # emptied: a real answer, the other partition untouched
    assert summaries == [PartitionSummary(0, None, None, 0, 0)]
    with database(store_url) as db:
        assert db.partition_sizes() == {"2": 1}


class StandInTable(dg.Config):
    names: list[str]
    with_size: bool = False


SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("name", "VARCHAR", description="The segment's name."),
        dg.TableColumn("size", "BIGINT", description="Its members."),
    ]
)


@dg.asset(name="unpartitioned", metadata={"dagster/column_schema": SCHEMA})
def whole_table(config: StandInTable) -> pd.DataFrame:
    frame = pd.DataFrame({"name": pd.Series(config.names, dtype="string")})
    frame["size"] = pd.Series(range(len(config.names)), dtype="Int64") if config.with_size else pd.NA
    return frame


@dg.asset(name="plain")
def plain_table(config: StandInTable) -> pd.DataFrame:
    return pd.DataFrame({"name": pd.Series(config.names, dtype="string")})


tables_read: list[pd.DataFrame] = []


@dg.asset
def table_reader(unpartitioned: pd.DataFrame) -> None:
    tables_read.append(unpartitioned)


def test_the_io_manager_replaces_a_whole_table_with_its_column_schema(
    instance: dg.DagsterInstance, store_url: str
) -> None:
    resources = {"io_manager": MatchallIOManager(store=store_url)}

    def write_table(asset: dg.AssetsDefinition, names: list[str], with_size: bool = False) -> None:
        tables_read.clear()
        config = {"names": names} | ({"with_size": with_size} if asset is whole_table else {})
        assets = [asset, table_reader] if asset is whole_table else [asset]
        assert dg.materialize(
            assets,
            run_config={"ops": {asset.key.path[-1]: {"config": config}}},
            instance=instance,
            resources=resources,
        ).success

    with pytest.raises(dg.Failure, match="not in the store"):  # read before it was ever written
        dg.materialize(
            [whole_table.to_source_asset(), table_reader],
            instance=instance,
            resources=resources,
            selection=[table_reader],
        )
    write_table(whole_table, [])  # empty: the table still exists, typed
    assert [frame.empty for frame in tables_read] == [True]
    write_table(whole_table, ["a", "b"])
    write_table(whole_table, ["c"], with_size=True)
    assert [frame.to_dict("records") for frame in tables_read] == [[{"name": "c", "size": 0}]]
    write_table(plain_table, ["x", "y"])  # no column schema: the frame's own columns
    with database(store_url) as db:
        assert db.columns("unpartitioned") == {
            "name": ("varchar", "The segment's name."),
            "size": ("bigint", "Its members."),
        }
        assert db.rows("select name from plain order by name") == [("x",), ("y",)]
        assert db.columns("plain")["name"][0] == "varchar"


# -- the frame the real asset returns ----------------------------------------------------------------


@pytest.mark.parametrize("contact_ids", [[], [7], [30, 10, 20], list(range(1, 1_001))])
def test_the_members_frame_is_typed_and_stored_as_varchar_and_bigints(store_url: str, contact_ids: list[int]) -> None:
    frame = members_frame("1ab85f0e-3b5c", np.asarray(contact_ids, dtype=np.int64))

    assert list(frame.columns) == ["segment_id", "position", "contact_id"]
    assert frame["position"].dtype == np.int64
    assert frame["contact_id"].dtype == np.int64
    assert frame["position"].tolist() == list(range(1, len(contact_ids) + 1))
    segment_type = frame["segment_id"].dtype
    assert isinstance(segment_type, pd.ArrowDtype)
    arrow_type = segment_type.pyarrow_dtype
    assert isinstance(arrow_type, pa.DictionaryType)  # the id is stored once, not once per row
    assert arrow_type.value_type == pa.string()
    assert frame["segment_id"].tolist() == ["1ab85f0e-3b5c"] * len(contact_ids)

    store = open_store(store_url)
    store.replace_partition("1ab85f0e-3b5c", frame)
    rows = store.read_partition("1ab85f0e-3b5c")
    assert rows.values.tolist() == [["1ab85f0e-3b5c", p, c] for p, c in enumerate(contact_ids, 1)]
    with database(store_url) as db:
        assert {name: kind for name, (kind, _) in db.columns(MATCHES_TABLE).items()} == MATCHES_TYPES


# -- the real segment_matches ----------------------------------------------------------------------


def materialize_real(
    defs: dg.Definitions, instance: dg.DagsterInstance, segment_id: str, **config: Any
) -> dg.ExecuteInProcessResult:
    return materialize_segment(defs, instance, segment_id, config, raise_on_error=False)


def test_rematerializing_a_segment_in_another_sort_replaces_its_rows(
    simulator_env: SimulatorServer, instance: dg.DagsterInstance, store_url: str
) -> None:
    defs = build_definitions(store=store_url)
    assert materialize_real(defs, instance, "10001").success
    assert materialize_real(defs, instance, "100").success  # the simulator's empty segment
    assert materialize_real(defs, instance, "1").success
    result = materialize_real(defs, instance, "10001", sort="-email")
    assert result.success
    store = open_store(store_url)
    truth = simulator_env.simulator
    assert store.read_partition("10001")["contact_id"].tolist() == truth.truth("10001", "-email")
    assert store.read_partition("1")["contact_id"].tolist() == truth.truth("1")
    with database(store_url) as db:
        assert db.partition_sizes() == {"10001": 10_001, "1": 1}
    (event,) = result.asset_materializations_for_node("segment_matches")
    assert event.metadata["dagster/partition_row_count"].value == 10_001
    assert event.metadata["dagster/storage_kind"].value == StoreUrl.parse(store_url).kind
    assert all(check.passed for check in result.get_asset_check_evaluations())


@pytest.mark.parametrize("segment_id", ["x' or '1'='1", "1'); drop table segment_matches; --", "a/../b", "1 "])
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
    with database(str(duckdb_file)) as db:
        assert db.partition_sizes() == {"1": 1}

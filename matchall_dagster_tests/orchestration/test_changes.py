"""segment_membership_changes: exact joined/left sets from a simulator whose segments evolve between runs."""

from __future__ import annotations

import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.changes import MAX_SHARE_VARIABLE, PLAUSIBLE
from matchall_dagster.settings import ConfigurationError, settings
from matchall_dagster.simulator import SimAccount, SimSegment, SimulatorServer
from matchall_dagster.storage.store import open_store
from matchall_dagster_tests.conftest import ServeSimulator, materialize_segment, set_setting
from matchall_dagster_tests.orchestration.stores import count, execute

CHANGES_KEY = DEFAULT_ACCOUNT.changes_key


def evolving_account() -> SimAccount:
    return SimAccount(
        seed=11,
        segments=[
            SimSegment("e", "Evolving", 30_000, churn=0.05, growth=0.02),
            SimSegment("jumpy", "Broken definition (80 % change)", 2_000, churn=0.8),
            SimSegment("empty", "Empty", 0),
        ],
    )


@pytest.fixture
def server(serve_simulator: ServeSimulator) -> SimulatorServer:
    return serve_simulator(evolving_account())


def materialize_changes(
    defs: dg.Definitions, instance: dg.DagsterInstance, segment_id: str
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [defs.get_assets_def(CHANGES_KEY)], partition_key=segment_id, instance=instance, resources=defs.resources
    )


def history(store: str | Path, segment_id: str, run_id: str) -> tuple[set[int], set[int]]:
    rows = execute(
        store,
        "select change, contact_id from segment_membership_changes where segment_id = ? and run_id = ?",
        [segment_id, run_id],
    )
    return {c for kind, c in rows if kind == "joined"}, {c for kind, c in rows if kind == "left"}


def metadata_of(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node(CHANGES_KEY.path[-1])
    return {key: value.value for key, value in materialization.metadata.items()}


def remote_run_id(result: dg.ExecuteInProcessResult) -> str:
    (materialization,) = result.asset_materializations_for_node("segment_matches")
    return str(materialization.metadata["run_id"].value)


def test_each_materialization_records_exactly_who_joined_and_who_left(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: joined and left computed in the database equal the simulator's generations."""
    defs = store_defs
    account = server.simulator.account
    members = [set(account.members("e", generation).tolist()) for generation in range(3)]
    for generation in range(3):
        run_id = remote_run_id(materialize_segment(defs, instance, "e"))  # each run: the next generation
        result = materialize_changes(defs, instance, "e")
        joined, left = history(store_url, "e", run_id)
        if generation == 0:
            assert (joined, left) == (members[0], set())  # the first step: everyone joined
        else:
            assert joined == members[generation] - members[generation - 1]
            assert left == members[generation - 1] - members[generation]
            assert joined
            assert left
        metadata = metadata_of(result)
        assert metadata["members"] == len(members[generation])
        assert (metadata["joined"], metadata["left"], metadata["appended"]) == (len(joined), len(left), True)
        previous = len(members[generation - 1]) if generation else 0
        assert metadata["churn_rate"] == pytest.approx((len(joined) + len(left)) / previous if previous else 0.0)
        assert metadata["run_id"] == run_id
        (check,) = result.get_asset_check_evaluations()
        assert (check.check_name, check.passed, check.partition) == (PLAUSIBLE, True, "e")


def test_a_re_run_appends_nothing(
    store_defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, store_url: str
) -> None:
    """On each engine: the same materialization of segment_matches recorded twice appends nothing."""
    defs = store_defs
    materialize_segment(defs, instance, "e")
    materialize_changes(defs, instance, "e")
    materialize_segment(defs, instance, "e")
    first = metadata_of(materialize_changes(defs, instance, "e"))
    before = count(store_url, "segment_membership_changes")
    state = count(store_url, "segment_membership_state")
    assert before > first["members"]  # two steps: everyone joined, then the changes
    again = metadata_of(materialize_changes(defs, instance, "e"))
    assert again["appended"] is False
    assert {k: again[k] for k in ("members", "joined", "left", "run_id")} == {
        k: first[k] for k in ("members", "joined", "left", "run_id")
    }
    assert count(store_url, "segment_membership_changes") == before
    assert count(store_url, "segment_membership_steps") == 2
    assert count(store_url, "segment_membership_state") == state == first["members"]


def test_a_segment_that_changes_too_much_in_one_step_is_flagged(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer
) -> None:
    materialize_segment(defs, instance, "jumpy")
    assert materialize_changes(defs, instance, "jumpy").get_asset_check_evaluations()[0].passed  # first step
    materialize_segment(defs, instance, "jumpy")
    result = materialize_changes(defs, instance, "jumpy")
    assert result.success  # a warning, not a failure: the history is still recorded
    (check,) = result.get_asset_check_evaluations()
    assert (check.check_name, check.passed, check.severity) == (PLAUSIBLE, False, dg.AssetCheckSeverity.WARN)
    assert "changed in one step" in (check.description or "")
    share = check.metadata["churn_rate"].value
    assert isinstance(share, float)
    assert 0.8 * 2 - 0.1 < share < 0.8 * 2 + 0.1  # 80 % left and as many joined


def test_the_threshold_is_configurable(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    materialize_segment(defs, instance, "e")
    materialize_changes(defs, instance, "e")
    materialize_segment(defs, instance, "e")
    set_setting(monkeypatch, MAX_SHARE_VARIABLE, "0.01")  # about 10 % of "e" changes a step
    (check,) = materialize_changes(defs, instance, "e").get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["max_change_share"].value == 0.01


@pytest.mark.parametrize("raw", ["0", "1.5", "half", "-0.2", "nan"])
def test_a_bad_threshold_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    set_setting(monkeypatch, MAX_SHARE_VARIABLE, raw)
    with pytest.raises(ConfigurationError, match=f"{MAX_SHARE_VARIABLE}: "):
        settings()


def test_an_empty_segment_and_a_segment_never_materialized(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer
) -> None:
    materialize_segment(defs, instance, "empty")
    metadata = metadata_of(materialize_changes(defs, instance, "empty"))
    assert (metadata["members"], metadata["joined"], metadata["left"]) == (0, 0, 0)
    instance.add_dynamic_partitions("segments", ["e"])
    failed = dg.materialize(
        [defs.get_assets_def(CHANGES_KEY)],
        partition_key="e",
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
    )
    assert not failed.success
    (failure,) = [event for event in failed.all_events if event.is_step_failure]
    assert "has no materialization of segment_matches yet; materialize it first" in str(failure.event_specific_data)


def test_changes_are_requested_after_each_new_materialization(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer
) -> None:
    """The automation condition: nothing to do until segment_matches updates, then that partition."""
    instance.add_dynamic_partitions("segments", ["e", "jumpy"])
    selection = dg.AssetSelection.assets(CHANGES_KEY)
    idle = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
    assert idle.total_requested == 0  # nothing materialized upstream yet
    materialize_segment(defs, instance, "e")
    after = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=selection, cursor=idle.cursor
    )
    assert after.get_requested_partitions(CHANGES_KEY) == {"e"}
    sensor = defs.resolve_sensor_def("membership_changes_automation")
    assert sensor.default_status is dg.DefaultSensorStatus.RUNNING


def test_a_large_segment_is_compared_without_python_objects_per_id(tmp_path: Path) -> None:
    """The step is SQL under the project's DuckDB memory cap: Python allocates next to nothing for it."""
    n = 2_000_000
    ids = np.random.default_rng(5).permutation(2 * n)[:n].astype(np.int64)
    url = f"duckdb://{tmp_path / 'big.duckdb'}"
    store = open_store(url)
    store.replace_partition(
        "big", pd.DataFrame({"segment_id": "big", "position": np.arange(1, n + 1), "contact_id": ids})
    )
    del ids
    store.record_step("big", source="1", run_id="r1", observed_at=datetime.now(UTC))
    execute(url, "update segment_matches set contact_id = contact_id + 10 * ? where position <= 20000", [n])
    tracemalloc.start()
    started = time.perf_counter()
    step = store.record_step("big", source="2", run_id="r2", observed_at=datetime.now(UTC))
    elapsed = time.perf_counter() - started
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (step.joined, step.left, step.members) == (20_000, 20_000, n)
    print(f"\n{n:,} members, 1 % changed: {elapsed:.2f} s, Python allocated at most {python_peak / 1024:.0f} KiB")
    assert python_peak < 1_000_000  # one int object per changed id alone would take 1.1 MB


def test_the_asset_key_is_its_table_s_name() -> None:
    from matchall_dagster.storage.history import CHANGES_TABLE

    assert CHANGES_KEY.path == [CHANGES_TABLE]
